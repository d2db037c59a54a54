"""Study throughput: today's path against the new one, on the same machine in the same run.

Two small studies, each run whole by `isolocal compare` (pre-training, k-NN and per-stage linear
probes selected on the validation split, one read of the test split, analysis, report):
- `vit`: `localmim_vit_nano` global and isolated, `--seeds` seeds each, `--epochs` epochs on the
  quickstart's 6,144-image subset;
- `resnet`: ResNet-32 split into K = 4 isolated stages with auxiliary classifiers, `--seeds` seeds.

Paths (`--paths`):
- `today`: the code of `--baseline` (a git revision, default the last commit before the fast path),
  unpacked with `git archive`, one run at a time (study.parallel = 1) with every thread;
- `today_p2`: the same code, two runs at a time with one thread each (study.parallel = 2);
- `new`: this checkout with its defaults: one run per core with an even share of the threads
  (study.parallel = 0), evaluation images transformed a batch at a time;
- `new_p1`: this checkout, one run at a time with every thread (the batched evaluation alone).

Printed per study and path: the whole `compare` wall-clock, pre-training images/s summed over all runs
(every image of every run over the time any run was pre-training), and the ratios against `today`;
then whether every run's final loss and test accuracies equal those of today's path with the same
threads per run (a CPU sum's last bits depend on the thread count, nothing else may change them).
Last, the step's profile by op family (matmul, attention, convolution, other elementwise, targets,
optimizer, data wait) with every thread (one run at a time) and with one (one run per core), and the
matmul share's rate against a narrow matmul's (2048 x 64 x 256) measured in the same run.

Run from the repository root of a git checkout, with nothing else running (about 40 minutes with
the defaults on 2 CPU cores):

    python -m benchmarks.study_throughput
    python -m benchmarks.study_throughput --studies vit --seeds 1 --epochs 1 --paths today new   # a quick look
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
BASELINE = "bf922b8"  # the last commit before prefetching and batched evaluation transforms
# path -> (code, study.parallel); 0 is the checkout's default (one run per core)
PATHS = {"today": ("baseline", 1), "today_p2": ("baseline", 2), "new": ("checkout", 0), "new_p1": ("checkout", 1)}

STUDIES = {
    "vit": """
[study]
name = "bench_vit"
seeds = {seeds}
evals = ["knn", "linear"]
baseline = "localmim_global"
images = "fmnist:0,1,2,3,4,5,6,7"
query = [[3, 3]]

[base]
preset = "localmim_vit_nano"

[base.data]
name = "fashion_mnist"
train_subset = 6144

[base.train]
epochs = {epochs}
batch_size = 128
base_lr = 2e-3
warmup_epochs = 1
log_every = 10

[base.eval]
feature = "mean"
train_subset = 10000
linear_epochs = 10

[variants.localmim_global]
model = {{ boundary = "global" }}

[variants.localmim_isolated]
model = {{ boundary = "isolated" }}
""",
    "resnet": """
[study]
name = "bench_resnet"
seeds = {seeds}
evals = ["knn", "linear"]
baseline = "classify_k4"
nmi_layers = []

[base]
preset = "resnet32_k4"

[base.data]
name = "fashion_mnist"
pad = 2
crop_scale_min = 0.5
train_subset = 6144

[base.train]
epochs = {epochs}
batch_size = 128
base_lr = 1.6e-2
warmup_epochs = 0.25
log_every = 8

[base.eval]
feature = "mean"
train_subset = 10000
linear_epochs = 10

[variants.classify_k4]
model = {{ boundary = "isolated" }}
""",
}


def unpack_baseline(rev: str, into: Path) -> Path:
    """The baseline revision's files (no git metadata), for today's path."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def pretrain_rate(study_dir: Path) -> tuple[float, int]:
    """(images/s summed over runs: every pre-training image over the union of the runs' pre-training
    intervals, images)."""
    spans, images = [], 0
    for summary in study_dir.glob("runs/*/*/pretrain.json"):
        pre = json.loads(summary.read_text())
        config = json.loads((summary.parent / "run.json").read_text())["config"]
        end = summary.stat().st_mtime
        spans.append((end - pre["time"], end))
        images += pre["steps"] * config["train"]["batch_size"]
    covered, last_end = 0.0, float("-inf")
    for start, end in sorted(spans):
        start = max(start, last_end)
        if end > start:
            covered += end - start
        last_end = max(last_end, end)
    return images / covered, images


def run_numbers(study_dir: Path) -> dict[str, dict]:
    """Each run's final loss and test accuracies, by run: what every path must reproduce."""
    out = {}
    for result in sorted(study_dir.glob("runs/*/*/result.json")):
        out[f"{result.parent.parent.name}/{result.parent.name}"] = json.loads(result.read_text()).get("headline")
    return out


def run_path(name: str, study: str, tree: Path, parallel: int, work: Path, args: argparse.Namespace) -> dict:
    config = work / f"{study}.toml"
    out = work / f"{study}_{name}"
    runs_at_once = parallel or args.threads
    env = {**{k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}, "PYTHONPATH": str(tree)}
    if parallel:  # 0: the checkout's runner splits the threads itself
        env["OMP_NUM_THREADS"] = str(max(1, args.threads // parallel))
    command = [sys.executable, "-m", "isolocal", "compare", "-c", str(config), "--set", f"study.out_dir={out}",
               f"study.parallel={parallel}"]
    print(f"[bench] {study} / {name}: {' '.join(command[2:])}", flush=True)
    start = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=tree, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"[bench] {study} / {name} failed ({done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    rate, images = pretrain_rate(out)
    return {"study": study, "path": name, "runs_at_once": runs_at_once,
            "threads_per_run": max(1, args.threads // runs_at_once), "wall_s": wall, "pretrain_img_s": rate,
            "images": images, "numbers": run_numbers(out)}


def compare_paths(rows: list[dict]) -> pd.DataFrame:
    """Ratios against `today` of the same study, and whether every run's numbers equal those of today's
    path with the same threads per run."""
    table = pd.DataFrame([{k: v for k, v in r.items() if k != "numbers"} for r in rows])
    today = {r["study"]: r for r in rows if r["path"] == "today"}
    same_threads = {(r["study"], r["threads_per_run"]): r for r in rows if r["path"].startswith("today")}
    table["wall_vs_today"] = [today[r["study"]]["wall_s"] / r["wall_s"] if r["study"] in today else None for r in rows]
    table["img_s_vs_today"] = [r["pretrain_img_s"] / today[r["study"]]["pretrain_img_s"] if r["study"] in today
                               else None for r in rows]
    table["same_numbers_as"] = [
        f"{ref['path']}: {r['numbers'] == ref['numbers']}" if (ref := same_threads.get((r["study"], r["threads_per_run"])))
        else "" for r in rows]
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--studies", nargs="+", default=list(STUDIES), choices=list(STUDIES))
    p.add_argument("--paths", nargs="+", default=["today", "today_p2", "new"], choices=list(PATHS))
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="threads per path: one run with all, or split over parallel runs")
    p.add_argument("--baseline", default=BASELINE, help="git revision of today's path")
    p.add_argument("--profile-steps", type=int, default=8)
    p.add_argument("--keep", default="", help="keep the studies' files in this directory (default: a temporary one)")
    args = p.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="isolocal-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    trees = {"checkout": REPO}
    if any(PATHS[name][0] == "baseline" for name in args.paths):
        trees["baseline"] = unpack_baseline(args.baseline, work / "baseline")
    rows = []
    for study in args.studies:
        (work / f"{study}.toml").write_text(STUDIES[study].format(seeds=list(range(args.seeds)), epochs=args.epochs))
        for name in args.paths:
            source, parallel = PATHS[name]
            rows.append(run_path(name, study, trees[source], parallel, work, args))
    print(f"\n# Study throughput ({args.seeds} seeds, {args.epochs} epochs, {args.threads} threads; today = "
          f"{args.baseline}; {time.strftime('%Y-%m-%d')})\n")
    print(compare_paths(rows).to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    from benchmarks.step_profile import profile_report  # deferred: the studies above run in their own processes
    print("\n# Where a step goes: localmim_vit_nano isolated, batch 128 (ms per step of one run)\n")
    print(profile_report(args.profile_steps, args.threads).to_string(float_format=lambda v: f"{v:.3g}"))


if __name__ == "__main__":
    main()
