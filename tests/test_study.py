"""A 2-seed x 2-variant study with fine-tuning, end to end on a small Fashion-MNIST subset: `--only`,
a hard kill mid-study, resume, then the report's numbers against scipy on the runs' own files."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from isolocal.cli import main
from isolocal.config import ConfigError
from isolocal.study.runner import check_stale
from isolocal.study.schema import load_study

STUDY = """
[study]
name = "tiny"
out_dir = "{out}"
images = "fmnist:0,1"
query = [[2, 2]]
seeds = [0, 1]
evals = ["knn", "linear", "finetune"]
baseline = "global"
nmi_layers = [2]

[study.claims.isolation]
a = "isolated"
b = "global"
metric = "nmi"
layer = 2
margin = 0.01
direction = "noninferior"

[base]
preset = "localmim_vit_nano"
[base.data]
name = "fashion_mnist"
train_subset = 96
[base.train]
epochs = 3
batch_size = 32
base_lr = 1e-3
warmup_epochs = 1
log_every = 1
knn_every_epochs = 1
[base.eval]
feature = "mean"
knn_k = 5
linear_epochs = 3
finetune_epochs = 1
finetune_batch_size = 32
train_subset = 128
test_subset = 64

[variants.global]
model = {{ boundary = "global" }}
[variants.isolated]
model = {{ boundary = "isolated" }}
"""

RUNS = [("global", 0), ("isolated", 0), ("global", 1), ("isolated", 1)]


def _run_dir(root: Path, variant: str, seed: int) -> Path:
    return root / "runs" / variant / f"seed{seed}"


def _steps(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "step"]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Run global:0 alone (--only), start the whole study in a process group, kill it hard while
    isolated:0 runs, then resume to the end. Returns what the checks need."""
    tmp = tmp_path_factory.mktemp("study")
    root = tmp / "out"
    path = tmp / "study.toml"
    path.write_text(STUDY.format(out=root))
    assert main(["compare", "-c", str(path), "--only", "global:0"]) == 0
    first = _run_dir(root, "global", 0)
    assert json.loads((first / "result.json").read_text())["status"] == "ok"
    assert not (root / "runs" / "isolated").exists()
    kept = {name: ((first / name).read_bytes(), (first / name).stat().st_mtime_ns)
            for name in ("result.json", "metrics.jsonl", "probes.json", "finetune.json", "last.pt")}

    victim = _run_dir(root, "isolated", 0)
    proc = subprocess.Popen([sys.executable, "-m", "isolocal", "compare", "-c", str(path)], start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not (victim / "last.pt").exists():  # its first epoch's checkpoint
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() is not None else ""
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the study and its run's process, mid-run
    proc.wait()
    output = proc.stdout.read()
    assert "1 already finished, 3 to run" in output
    assert not (victim / "result.json").exists()
    left = {"pretrain_done": (victim / "pretrain.json").exists()}

    assert main(["compare", "-c", str(path)]) == 0
    return {"root": root, "path": path, "kept": kept, "left": left, "victim": victim}


@pytest.mark.slow
def test_resume_keeps_finished_runs_and_continues_the_killed_one(study):
    first = _run_dir(study["root"], "global", 0)
    for name, (data, mtime) in study["kept"].items():
        assert (first / name).read_bytes() == data and (first / name).stat().st_mtime_ns == mtime, name
    for variant, seed in RUNS:
        assert json.loads((_run_dir(study["root"], variant, seed) / "result.json").read_text())["status"] == "ok"
    victim, left = study["victim"], study["left"]
    summary = json.loads((victim / "pretrain.json").read_text())
    if not left["pretrain_done"]:  # killed during pre-training, after its first epoch's checkpoint
        assert summary["resumed_from_step"] >= 3
    steps = [r["step"] for r in _steps(victim)]
    assert steps == list(range(9))  # 3 epochs of 3 steps, each logged once: nothing lost, nothing twice
    log = (victim / "run.log").read_text()
    assert log.count("==== ") == 2  # two launches of the job, one log


@pytest.mark.slow
def test_runs_are_paired_by_seed(study):
    first = {(v, s): _steps(_run_dir(study["root"], v, s))[0]["loss_stage"] for v, s in RUNS}
    # same seed: same init, data and masks, so the first step's losses agree across boundaries
    assert first[("global", 0)] == pytest.approx(first[("isolated", 0)], rel=1e-6)
    assert first[("global", 1)] == pytest.approx(first[("isolated", 1)], rel=1e-6)
    assert first[("global", 0)] != pytest.approx(first[("global", 1)], rel=1e-3)


@pytest.mark.slow
def test_report_shows_every_variants_reconstruction_on_the_same_image_and_mask(study):
    report = (study["root"] / "report.md").read_text()
    assert "### reconstruct run" in report
    tables = []
    for variant in ("global", "isolated"):
        run = _run_dir(study["root"], variant, 0)
        assert f"runs/{variant}/seed0/reconstruct_run.png" in report
        tables.append(pd.read_csv(run / "reconstruct_run.csv"))
    # one image, one mask (seed 0): same cells for both variants, one error row per stage
    assert list(tables[0]["mask_seed"].unique()) == [0] and len(tables[0]) == len(tables[1])
    assert tables[0].drop(columns=[c for c in tables[0] if "err" in c or c == "run"]).equals(
        tables[1].drop(columns=[c for c in tables[1] if "err" in c or c == "run"]))


def _numbers(root: Path, variant: str, metric: str) -> np.ndarray:
    out = []
    for seed in (0, 1):
        run = _run_dir(root, variant, seed)
        if metric == "finetune":
            out.append(json.loads((run / "finetune.json").read_text())["results"][0]["finetune_top1"])
        elif metric == "nmi2":
            out.append(pd.read_csv(run / "analysis.csv").set_index("layer").loc[2, "nmi"])
        else:  # the test top-1 of the stage chosen on validation
            probes = json.loads((run / "probes.json").read_text())
            out.append(probes["results"][probes["selected"][metric]][f"{metric}_top1"])
    return np.array(out)


def _interval(x: np.ndarray) -> tuple[float, float]:
    """scipy's 95% t-interval of the mean (a point when every value is equal)."""
    if np.ptp(x) == 0:
        return x.mean(), x.mean()
    return stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))


def _table(report: str, heading: str) -> pd.DataFrame:
    """A markdown table of report.md (the first one after `heading`) as strings."""
    lines = report.split(f"## {heading}", 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return pd.DataFrame(rows[2:], columns=rows[0])


@pytest.mark.slow
def test_report_numbers_equal_scipy_on_the_runs_files(study):
    root = study["root"]
    report = (root / "report.md").read_text()
    # summary.csv holds the runs' own numbers, in long form
    summary = pd.read_csv(root / "summary.csv")
    assert list(summary.columns) == ["variant", "seed", "metric", "stage", "layer", "value"]
    ft = summary[(summary.metric == "finetune")].set_index(["variant", "seed"])["value"]
    assert ft["isolated"].to_numpy() == pytest.approx(_numbers(root, "isolated", "finetune"))
    knn = summary[(summary.metric == "knn") & (summary.variant == "global") & (summary.seed == 1)]
    probes = json.loads((_run_dir(root, "global", 1) / "probes.json").read_text())["results"]
    assert list(knn["value"]) == pytest.approx([r["knn_top1"] for r in probes])
    assert list(knn["layer"]) == [r["tap"] + 1 for r in probes]

    # mean +- 95% t half-width over the two seeds
    for heading, column, metric in [("Fine-tuning", "fine-tune test top-1 %", "finetune"),
                                    ("k-NN top-1 % on test", "k-NN test top-1 %, stage chosen on val", "knn"),
                                    ("Linear probe top-1 % on test", "linear test top-1 %, stage chosen on val",
                                     "linear")]:
        table = _table(report, heading).set_index("variant")
        for variant in ("global", "isolated"):
            x = _numbers(root, variant, metric)
            low, high = _interval(x)
            assert table.loc[variant, column] == f"{x.mean():.2f} ± {(high - low) / 2:.2f}"

    # paired differences to the baseline: mean, t-interval and ttest_rel on the per-seed differences
    paired = _table(report, "Paired differences").set_index("metric")
    for label, metric, digits in [("fine-tune test top-1 %", "finetune", 3),
                                  ("linear test top-1 %, stage chosen on val", "linear", 3), ("NMI, layer 2", "nmi2", 5)]:
        a, b = _numbers(root, "isolated", metric), _numbers(root, "global", metric)
        d = a - b
        row = paired.loc[label]
        assert row["mean (variant − global)"] == f"{d.mean():.{digits}f}"
        if np.ptp(d) > 0:
            low, high = _interval(d)
            assert row["95% CI"] == f"[{low:.{digits}f}, {high:.{digits}f}]"
            assert row["p (paired t, two-sided, d = 0)"] == f"{stats.ttest_rel(a, b).pvalue:.3g}"
    claim = _table(report, "Claims").set_index("claim").loc["isolation"]
    d = _numbers(root, "isolated", "nmi2") - _numbers(root, "global", "nmi2")
    low, high = _interval(d)
    expected = "holds" if low > -0.01 else "fails" if high < -0.01 else "undecided"
    assert claim["verdict"] == f"**{expected}**"
    assert "## Time to accuracy" in report and (root / "online_knn.png").read_bytes()[:4] == b"\x89PNG"
    for fig in ("loss_curves.png", "nmi_vs_depth.png", "attention_distance_vs_depth.png"):
        assert (root / fig).read_bytes()[:4] == b"\x89PNG"
    assert "runs/isolated/seed0/attention_maps.png" in report


@pytest.mark.slow
def test_report_only_rebuilds_the_same_report(study, capsys):
    root = study["root"]
    before = (root / "report.md").read_text(), (root / "summary.csv").read_text()
    (root / "report.md").unlink()
    assert main(["compare", "-c", str(study["path"]), "--report-only"]) == 0
    assert ((root / "report.md").read_text(), (root / "summary.csv").read_text()) == before


@pytest.mark.slow
def test_changed_study_file_is_refused_before_any_work(study):
    changed = load_study(study["path"], ["base.train.epochs=4"])
    with pytest.raises(ConfigError, match=r"seed0 was run with a different config: config.train.epochs \(3 -> 4\)"):
        check_stale(changed, changed.runs())
    faster = load_study(study["path"], ["base.data.prefetch=true"])  # how fast, not what: the runs stay current
    check_stale(faster, faster.runs())


@pytest.mark.slow
def test_one_seed_study_without_seeds_and_a_failing_variant(tmp_path, capsys):
    """A study file from before seeds: runs/<variant>/, no CIs; a failing run is recorded, the others go on."""
    path = tmp_path / "study.toml"
    path.write_text(f"""
[study]
out_dir = "{tmp_path / 'out'}"
images = "fmnist:0"
query = [[2, 2]]
[base]
preset = "localmim_vit_nano"
[base.data]
name = "fashion_mnist"
[base.eval]
feature = "mean"
knn_k = 5
linear_epochs = 1
train_subset = 64
test_subset = 32
[variants.random]
[variants.broken]  # fails only while it trains: its loss is not finite by the third step
data = {{ train_subset = 64 }}
train = {{ base_lr = 1e9, batch_size = 16, epochs = 1 }}
""")
    assert main(["compare", "-c", str(path)]) == 1  # a run failed
    captured = capsys.readouterr()
    out = captured.out
    assert "random seed 0 done" in out and "broken seed 0 FAILED" in out and "non-finite values at step" in out
    assert re.search(r"\[compare\] \d+ run\(s\) at a time(, \d+ thread\(s\) each)? \(study.parallel = 0: one per core", out)
    assert "isolocal compare: 1 of 2 runs failed (broken seed 0); see the report" in captured.err
    root = tmp_path / "out"
    assert (root / "runs" / "random" / "result.json").exists()
    report = (root / "report.md").read_text()
    assert "One seed per variant: values below have no confidence intervals" in report
    assert "**broken seed 0 failed**" in report and "±" not in report
    knn = _table(report, "k-NN top-1 % on test").set_index("variant")
    probes = json.loads((root / "runs" / "random" / "probes.json").read_text())
    chosen = probes["results"][probes["selected"]["knn"]]["knn_top1"]
    assert knn.loc["random", "k-NN test top-1 %, stage chosen on val"] == f"{chosen:.2f}"
    assert knn.loc["broken", "k-NN test top-1 %, stage chosen on val"] == "–"


@pytest.mark.slow
def test_every_file_a_study_writes_keeps_the_umask(tmp_path):
    """Result files, checkpoints, logs, figures and the report: the mode a plain open gives under the
    user's umask (0640 under 027), never mkstemp's private 0600, so collaborators can read them."""
    path = tmp_path / "study.toml"
    path.write_text(f"""
[study]
out_dir = "{tmp_path / 'out'}"
images = "fmnist:0"
query = [[2, 2]]
[base]
preset = "localmim_vit_nano"
[base.data]
name = "fashion_mnist"
train_subset = 32
[base.train]
batch_size = 16
[base.eval]
feature = "mean"
knn_k = 5
linear_epochs = 1
train_subset = 64
test_subset = 32
[variants.trained]
""")
    previous = os.umask(0o027)
    try:
        assert main(["compare", "-c", str(path)]) == 0
    finally:
        os.umask(previous)
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"run.json", "pretrain.json", "probes.json", "result.json", "metrics.jsonl", "last.pt", "run.log",
            "report.md", "summary.csv"} <= names
    modes = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in files}
    assert set(modes.values()) == {"0o640"}, modes


def test_parallel_runs_share_the_cores_unless_told(monkeypatch):
    from isolocal.study.runner import run_env, run_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    share = max(1, len(os.sched_getaffinity(0)) // 2)
    assert run_threads(1) is None and "OMP_NUM_THREADS" not in run_env(1)
    assert run_threads(2) == share and run_env(2)["OMP_NUM_THREADS"] == str(share)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's choice stands
    assert run_threads(2) is None and run_env(2)["OMP_NUM_THREADS"] == "3"
