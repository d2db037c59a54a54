"""Throughput of the isolated pipeline schedule vs DeepSpeed's default schedule, on the same model.

For each pipeline size (one torchrun launch of that many CPU processes, gloo) and micro-batch count,
three real DeepSpeed engines train the same isolated model on the same data, alternating block by
block so they see the same machine load:
- isolated: the isolated schedule (`IsolatedScheduleEngine`: forward, send, local backward; no
  gradient traffic);
- default: DeepSpeed's default 1F1B schedule on the same isolated model (`DefaultScheduleEngine`:
  zero gradients are sent back across rank boundaries, each rank waits for them);
- global: the default schedule on the global model (gradients cross boundaries), for scale.
A block is `--steps` optimizer steps timed on rank 0 between barriers; the table shows the median
images/s over `--repeats` blocks and the ratios isolated/default and isolated/global.

    OMP_NUM_THREADS=1 python benchmarks/bench_pipeline.py                 # ~5 min on 2 cores
    OMP_NUM_THREADS=1 python benchmarks/bench_pipeline.py --stages 2 --micro-batches 4 --repeats 3

With more processes than cores the ranks time-share the CPU, so the numbers compare schedules
(work and waiting), not the speed-up a machine with one core (or GPU) per rank would show. For the
pipeline against one worker and data parallelism on the same cores, with the balance bound and the
cost model's prediction, see benchmarks/bench_scaling.py.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {"isolated": ("isolated", "auto"), "default": ("isolated", "default"), "global": ("global", "default")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="localmim_vit_micro")
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 4], help="pipeline sizes (processes)")
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--micro-batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per timed block")
    parser.add_argument("--repeats", type=int, default=5, help="timed blocks per engine (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per engine first")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: result file of a launched rank
    return parser.parse_args(argv)


def worker(args: argparse.Namespace) -> None:
    """One launched rank."""
    from isolocal.train.pipeline.runner import exit_on_failure, init_distributed, shutdown

    init_distributed(torch.device("cpu"), timeout_s=300)
    with exit_on_failure():
        time_engines(args)
    shutdown()


def time_engines(args: argparse.Namespace) -> None:
    """Build every (micro-batches, variant) engine, time them alternately; rank 0 writes the times."""
    import torch.distributed as dist
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

    import isolocal
    from isolocal.train.pipeline.engine import build_engine
    from isolocal.train.pipeline.module import StagePipe

    world, rank = dist.get_world_size(), dist.get_rank()
    engines, feeds = {}, {}
    for m in args.micro_batches:
        for name, (boundary, schedule) in VARIANTS.items():
            torch.manual_seed(0)
            model = isolocal.create_model(args.preset, boundary=boundary)
            pipe = StagePipe(model, PipeDataParallelTopology(num_pp=world, num_dp=1))
            params = [p for p in pipe.parameters() if p.requires_grad]
            engine = build_engine(pipe, torch.optim.AdamW(params, lr=1e-4), args.micro_batch_size, m, schedule)
            engines[m, name] = engine
        g = torch.Generator().manual_seed(m)
        size, chans = model.img_size, model.cfg.in_chans
        feeds[m] = [((torch.randn(args.micro_batch_size, chans, size, size, generator=g),
                      model.random_mask(args.micro_batch_size, generator=g).to(torch.uint8)), torch.zeros(1))
                    for _ in range(m)]

    def block(key: tuple[int, str], steps: int) -> float:
        engine, data = engines[key], feeds[key[0]]
        dist.barrier()
        start = time.perf_counter()
        for _ in range(steps):
            engine.train_batch(iter(data) if engine.is_first_stage() or engine.is_last_stage() else None)
        dist.barrier()
        return time.perf_counter() - start

    for key in engines:
        block(key, args.warmup)
    times: dict[str, list[float]] = {f"{m},{name}": [] for m, name in engines}
    for _ in range(args.repeats):
        for key in engines:
            times[f"{key[0]},{key[1]}"].append(block(key, args.steps))
    if rank == 0:
        Path(args.worker).write_text(json.dumps(times))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: argparse.Namespace, stages: int, result: Path) -> dict[str, list[float]]:
    """One torchrun launch of `stages` CPU ranks running `worker`."""
    forward = ["--preset", args.preset, "--micro-batches", *map(str, args.micro_batches),
               "--micro-batch-size", str(args.micro_batch_size), "--steps", str(args.steps),
               "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--worker", str(result)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(stages),
           "--master-port", str(free_port()), __file__, *forward]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        sys.exit(f"benchmark launch with {stages} ranks failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(result.read_text())


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    import pandas as pd

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for stages in args.stages:
            start = time.perf_counter()
            times = launch(args, stages, Path(tmp) / f"bench_{stages}.json")
            print(f"{stages} ranks: {time.perf_counter() - start:.0f} s", file=sys.stderr)
            for m in args.micro_batches:
                images = m * args.micro_batch_size * args.steps
                speed = {name: statistics.median(images / t for t in times[f"{m},{name}"]) for name in VARIANTS}
                rows.append({"stages": stages, "micro_batches": m, **{f"{k}_img_s": v for k, v in speed.items()},
                             "isolated/default": speed["isolated"] / speed["default"],
                             "isolated/global": speed["isolated"] / speed["global"]})
    table = pd.DataFrame(rows)
    print(f"{args.preset}, micro-batch {args.micro_batch_size} images, CPU gloo, median of {args.repeats} blocks "
          f"of {args.steps} steps, {os.environ.get('OMP_NUM_THREADS', '?')} thread(s) per rank")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    if args.json:
        Path(args.json).write_text(table.to_json(orient="records", indent=2))


if __name__ == "__main__":
    main()
