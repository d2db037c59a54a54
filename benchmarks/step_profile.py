"""Where one pre-training step goes, by op family: the profile `study_throughput` prints.

A quickstart run (`localmim_vit_nano` isolated, batch 128, Fashion-MNIST) is built by the trainer
itself and stepped by hand: the time the loop waits for its next batch (data), then `train_step`
under torch.profiler. Each op's own time goes to one family: targets (everything under the target
bank), optimizer (under `Optimizer.step`), matmul, attention, convolution, other (elementwise,
norms, copies, masking). Measured with every thread (one run at a time, as a study ran before) and
with one (each of one-per-core runs, a study's default now): what scales with threads and what does
not is why two one-thread runs train more images per second than one two-thread run.

    python -m benchmarks.step_profile            # 2 threads and 1, 8 profiled steps
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable

import pandas as pd
import torch
from torch.profiler import ProfilerActivity, profile, record_function

from isolocal.study.schema import load_study, resolve_run
from isolocal.train.trainer import Trainer

MATMUL = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}


def family(name: str, regions: set[str]) -> str:
    """An op's family; the region it runs under (targets, optimizer) wins over its name."""
    for region in ("targets", "optimizer"):
        if region in regions:
            return region
    if name in MATMUL:
        return "matmul"
    if "scaled_dot_product" in name or "flash_attention" in name:
        return "attention"
    if "convolution" in name:
        return "convolution"
    return "other"


def _regions(event) -> set[str]:
    found = set()
    while event is not None:
        if event.name == "targets":
            found.add("targets")
        elif event.name.startswith("Optimizer.step"):
            found.add("optimizer")
        event = event.cpu_parent
    return found


def _in_region(call: Callable, name: str) -> Callable:
    def wrapped(*args, **kwargs):
        with record_function(name):
            return call(*args, **kwargs)
    return wrapped


def step_profile(threads: int, steps: int) -> dict[str, float]:
    """ms per step by family at `threads` threads, the unprofiled step and data wait, and the matmul
    family's GFLOP/s."""
    torch.set_num_threads(threads)
    study = load_study("experiments/quickstart.toml")
    cfg = resolve_run(study, "localmim_isolated", 0)
    cfg.out_dir = tempfile.mkdtemp(prefix="isolocal-profile-")
    trainer = Trainer(cfg)
    bank = trainer.model.target_bank
    bank.forward = _in_region(bank.forward, "targets")
    batches = trainer.epoch_micro_batches()

    def timed_steps(n: int) -> tuple[float, float]:
        waits, runs = [], []
        for _ in range(n):
            start = time.perf_counter()
            micro = next(batches)
            waits.append(time.perf_counter() - start)
            start = time.perf_counter()
            trainer.train_step(micro)
            runs.append(time.perf_counter() - start)
        return 1e3 * statistics.median(waits), 1e3 * statistics.median(runs)

    timed_steps(3)  # warm-up
    wait, step = timed_steps(steps)
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        for _ in range(steps):
            trainer.train_step(next(batches))
    by_family: dict[str, float] = defaultdict(float)
    flops = matmul_us = 0.0
    for event in prof.events():
        kind = family(event.name, _regions(event))
        by_family[kind] += event.self_cpu_time_total / 1e3 / steps
        if kind == "matmul":
            flops += event.flops or 0
            matmul_us += event.self_cpu_time_total
    trainer.close()
    row = {f"{k} (profiled)": by_family.get(k, 0.0) for k in
           ("matmul", "attention", "convolution", "other", "targets", "optimizer")}
    row.update({"data wait": wait, "train_step": step, "step + data wait": step + wait,
                "matmul GFLOP/s": flops / matmul_us / 1e3 if matmul_us else 0.0})
    return row


def narrow_matmul_rate(repeats: int = 50) -> float:
    """GFLOP/s of a (2048 x 64) @ (64 x 256) matmul, the decoder's shape class."""
    a, b = torch.randn(2048, 64), torch.randn(64, 256)
    for _ in range(5):
        a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * 2048 * 64 * 256 / statistics.median(times) / 1e9


def profile_report(steps: int, threads: int) -> pd.DataFrame:
    before, after = f"{threads} threads", "1 thread"
    table = pd.DataFrame({before: step_profile(threads, steps), after: step_profile(1, steps)})
    torch.set_num_threads(threads)
    table.loc["narrow matmul GFLOP/s"] = [narrow_matmul_rate(), None]
    torch.set_num_threads(1)
    table.loc["narrow matmul GFLOP/s", after] = narrow_matmul_rate()
    table[f"{after} / {before}"] = table[after] / table[before]
    return table


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    print(profile_report(args.steps, args.threads).to_string(float_format=lambda v: f"{v:.3g}"))
