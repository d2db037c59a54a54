"""Pipeline scaling: S pipeline ranks against one worker and against data parallelism on the same
cores, with the balance bound and the cost model's prediction for every pipeline configuration.

Every configuration is a real `isolocal pretrain` run (torchrun for several processes) of the same
preset, batch and micro-batch size, one after another, each process with `--threads` threads:
- one worker, `--threads` threads (the baseline every ratio divides by) and S x `--threads` threads;
- data parallelism: S ranks (torchrun), each `M / S` micro-batches per step;
- the pipeline: S ranks (`--pipeline-stages S`, `pipeline.profile = true`), isolated and global.
Throughput is the median `img_per_s` of the log records of steps `--from-step` .. `--steps - 1`
(`train.log_every = --log-every`). In the same process, before the runs, every stage is timed on one
micro-batch with `--threads` threads (`measure_stage_costs`) and the first rank's data loading per
micro-batch; from those come the balance bound (one worker's work over the busiest rank's) and the
cost model's step time (`isolocal.train.pipeline.costmodel.predict`; the isolated schedule drains at log
steps only, DeepSpeed's 1F1B every step). Efficiency = measured speed-up over one worker / bound.
The per-rank breakdown of the fastest pipeline follows the table (`--figure`: its timeline).

    python benchmarks/bench_scaling.py            # ~6 min on 2 cores: S = 1, 2; isolated and global
    python benchmarks/bench_scaling.py --quick    # ~2 min smoke run: S = 2, isolated, 12 steps
    python benchmarks/bench_scaling.py --skip-wide  # without the S-thread worker (a busy machine)
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
SEND = (1e-4, 1e9)  # (latency s, bytes/s) of a CPU gloo send between processes on one machine, assumed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="localmim_vit_micro")
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2], help="pipeline sizes S (processes)")
    parser.add_argument("--boundaries", nargs="+", default=["isolated", "global"], choices=["isolated", "global"])
    parser.add_argument("--batch", type=int, default=64, help="images per optimizer step")
    parser.add_argument("--micro-batches", type=int, default=4, help="micro-batches per step (M)")
    parser.add_argument("--threads", type=int, default=1, help="threads per process")
    parser.add_argument("--steps", type=int, default=41)
    parser.add_argument("--from-step", type=int, default=8, help="first logged step counted")
    parser.add_argument("--log-every", type=int, default=8)
    parser.add_argument("--partition", default="count", choices=["count", "cost"])
    parser.add_argument("--set", dest="overrides", nargs="+", default=["data.name=fashion_mnist"],
                        metavar="KEY=VALUE", help="config overrides for every run")
    parser.add_argument("--quick", action="store_true", help="S = 2, isolated, 12 steps: a smoke run")
    parser.add_argument("--skip-wide", action="store_true",
                        help="skip the one worker with S x --threads threads (it oversubscribes a busy machine)")
    parser.add_argument("--json", help="also write the table here")
    parser.add_argument("--figure", help="also copy the fastest pipeline's timeline (pipeline_timeline.png) here")
    args = parser.parse_args(argv)
    if args.quick:
        args.stages, args.boundaries, args.steps, args.from_step, args.log_every = [2], ["isolated"], 12, 4, 4
    if args.batch % args.micro_batches or any(args.micro_batches % s for s in args.stages if s > 1):
        parser.error(f"--batch ({args.batch}) must split into --micro-batches ({args.micro_batches}), and those "
                     f"over every S in --stages {args.stages} (data parallelism gives each rank M / S)")
    if not 0 <= args.from_step < args.steps:
        parser.error(f"--from-step must be in [0, --steps), got {args.from_step} with --steps {args.steps}")
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: argparse.Namespace, out: Path, processes: int, threads: int, settings: list[str],
        pipeline: bool = False) -> float:
    """One `isolocal pretrain` run (a pipeline of `processes` ranks with `pipeline`); its median img/s
    over the counted log records."""
    launcher = [sys.executable, "-m", "isolocal"] if processes == 1 and not pipeline else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes), "--master-port",
         str(free_port()), "-m", "isolocal"]
    common = [f"preset={args.preset}", f"train.batch_size={args.batch}", f"train.max_steps={args.steps}",
              f"train.log_every={args.log_every}", "train.epochs=1000", *args.overrides]
    cmd = [*launcher, "pretrain", "--out", str(out), *(["--pipeline-stages", str(processes)] if pipeline else []),
           "--set", *common, *settings]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "DS_ACCELERATOR": "cpu",
           "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    log = pd.read_json(out / "metrics.jsonl", lines=True)
    counted = log[(log.kind == "step") & (log.step >= args.from_step)]
    print(f"{out.name}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return statistics.median(counted.img_per_s)


def stage_costs(args: argparse.Namespace, boundary: str, micro_batch: int) -> tuple[list, float]:
    """Per-stage costs of one micro-batch with `--threads` threads, and the loader's time per micro-batch."""
    import isolocal
    from isolocal.data import build_loader
    from isolocal.train.pipeline.timing import measure_stage_costs
    from isolocal.config.load import load_run_config
    from isolocal.train.loop import build_train_dataset

    torch.set_num_threads(args.threads)
    cfg = load_run_config(None, [f"preset={args.preset}", f"model.boundary={boundary}", *args.overrides])
    torch.manual_seed(0)
    model = isolocal.model_from_config(cfg.model).train()
    costs = measure_stage_costs(model, micro_batch, repeats=5)
    loader = iter(build_loader(build_train_dataset(cfg), micro_batch, shuffle=True, seed=0, drop_last=True))
    next(loader)
    start, count = time.perf_counter(), 20
    for _ in range(count):
        images = next(loader)[0]
        model.random_mask(len(images))
    return costs, (time.perf_counter() - start) / count


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from isolocal.io.checkpoint import pipeline_client_state
    from isolocal.train.pipeline.costmodel import Link, balance_bound, predict

    m, micro = args.micro_batches, args.batch // args.micro_batches
    link = Link(*SEND)
    rows, profiles, timelines = [], {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for boundary in args.boundaries:
            costs, data_s = stage_costs(args, boundary, micro)
            n = len(costs)
            mode = f"model.boundary={boundary}"
            one = run(args, Path(tmp) / f"single_{boundary}_{args.threads}t", 1, args.threads,
                      [mode, f"train.accum_steps={m}"])
            one_guess = predict(costs, [0, n], m, "isolated", sync_every=1, data_s=data_s)
            rows.append({"setup": "one worker", "S": 1, "boundary": boundary, "threads": args.threads, "img_s": one,
                         "predicted_ms": 1e3 * one_guess.step_s})
            for s in args.stages:
                if s > 1 and not args.skip_wide:
                    wide = run(args, Path(tmp) / f"single_{boundary}_{s * args.threads}t", 1, s * args.threads,
                               [mode, f"train.accum_steps={m}"])
                    rows.append({"setup": f"one worker, {s * args.threads} threads", "S": s, "boundary": boundary,
                                 "threads": s * args.threads, "img_s": wide})
                if s > 1:
                    dp = run(args, Path(tmp) / f"dp_{boundary}_{s}", s, args.threads,
                             [mode, f"train.accum_steps={m // s}"])
                    rows.append({"setup": "data parallel", "S": s, "boundary": boundary, "threads": args.threads,
                                 "img_s": dp})
                out = Path(tmp) / f"pipe_{boundary}_{s}"
                speed = run(args, out, s, args.threads, [mode, f"pipeline.micro_batches={m}",
                            f"pipeline.partition={args.partition}", "pipeline.profile=true"], pipeline=True)
                parts = pipeline_client_state(out / "pipeline")["pipeline_parts"]
                schedule, sync = ("isolated", args.log_every) if boundary == "isolated" else ("1f1b", 1)
                guess = predict(costs, parts, m, schedule, link, sync_every=sync, data_s=data_s)
                rows.append({"setup": "pipeline", "S": s, "boundary": boundary, "threads": args.threads,
                             "img_s": speed, "parts": " | ".join(f"{a}-{b - 1}" for a, b in zip(parts, parts[1:])),
                             "bound": balance_bound(costs, parts, m, data_s), "predicted_ms": 1e3 * guess.step_s})
                profiles[boundary, s] = pd.read_json(out / "pipeline_profile.json").set_index("rank")
                timelines[boundary, s] = (out / "pipeline_timeline.png").read_bytes()
    table = pd.DataFrame(rows)
    base = table[table.setup == "one worker"].set_index("boundary").img_s
    dp = table[table.setup == "data parallel"].set_index(["boundary", "S"]).img_s
    table["vs_one_worker"] = table.img_s / table.boundary.map(base)
    table["vs_data_parallel"] = [r.img_s / dp.get((r.boundary, r.S), float("nan")) for r in table.itertuples()]
    table["efficiency"] = table.vs_one_worker / table.get("bound", float("nan"))
    table["measured_ms"] = 1e3 * args.batch / table.img_s
    table["predicted/measured"] = table.predicted_ms / table.measured_ms
    table["parts"] = table.parts.fillna("")
    print(f"{args.preset}, batch {args.batch} as {m} micro-batches of {micro}, {args.threads} thread(s) per process, "
          f"median img/s over logged steps {args.from_step}-{args.steps - 1} (log every {args.log_every}), "
          f"{args.partition} partition, {' '.join(args.overrides)}")
    print(table.to_markdown(index=False, floatfmt=".3g"))
    pipes = table[table.setup == "pipeline"]
    if len(pipes):
        best = pipes.loc[pipes.img_s.idxmax()]
        print(f"\nper-rank time of the fastest pipeline ({best.boundary}, S = {best.S}), ms per step:")
        print(profiles[best.boundary, best.S].to_markdown(floatfmt=".1f"))
        if args.figure:
            Path(args.figure).write_bytes(timelines[best.boundary, best.S])
    if args.json:
        Path(args.json).write_text(table.to_json(orient="records", indent=2))


if __name__ == "__main__":
    main()
