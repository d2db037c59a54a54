"""Step time and peak memory of LocalMIM vs MAE vs MaskFeat, and of isolated vs global LocalMIM.

One process measures everything, so every ratio compares numbers taken on the same machine in the
same run. A step is forward + backward + AdamW step; the median over `--iters` steps after
`--warmup` steps is reported. Each configuration runs in a fresh process (so no allocator cache
carries over) and its peak memory is what training adds to the built model over all its steps:
gradients, optimizer state and activations, the weights and the batch excluded on both devices (CUDA
`max_memory_allocated`, CPU peak resident memory, each minus its value before the first step; see
`isolocal.train.logs.PeakMemory`).

Run from the repository root of a plain checkout (no install needed):

    python -m benchmarks.bench_models                       # CPU defaults: ViT-S and ViT-B at 224, batch 8
    python -m benchmarks.bench_models --sizes base --batch 256 --amp bf16 --device cuda --compile
"""
from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import statistics
import time

import pandas as pd
import torch

import isolocal
from isolocal.train.logs import PeakMemory
from isolocal.train.step import backward_step

MODELS = ("localmim", "mae", "maskfeat")


def measure(name: str, boundary: str, args: argparse.Namespace, device_name: str, compiled: bool = False) -> dict:
    """Median step time (s) and peak memory (MiB) of one preset in one boundary mode."""
    device = torch.device(device_name)
    torch.manual_seed(0)
    model = isolocal.create_model(name, boundary=boundary, img_size=args.img_size).to(device).train()
    if compiled:
        model.compile_stages()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, model.cfg.in_chans, args.img_size, args.img_size, device=device)
    dtype = {"bf16": torch.bfloat16, "off": None}[args.amp]
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext
    memory = PeakMemory(device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        backward_step(model, images, model.random_mask(args.batch, generator=gen), autocast=autocast)
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    memory.reset()  # after weights exist, before the first step: gradients, optimizer state and activations count
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.iters):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = memory.peak_mb()
    return {"model": name.split("_vit_")[0], "boundary": boundary, "compiled": compiled, "step_s": statistics.median(times),
            "img_per_s": args.batch / statistics.median(times), "peak_mem_mb": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="small,base", help="comma list of ViT sizes: tiny, small, base, large")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--amp", choices=("off", "bf16"), default="off")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="also time LocalMIM (global) with torch.compile'd stages")
    args = parser.parse_args()
    rows = []
    jobs = []
    for size in args.sizes.split(","):
        jobs += [(size, f"{model}_vit_{size}", "global", False) for model in MODELS]
        jobs.append((size, f"localmim_vit_{size}", "isolated", False))
        if args.compile:
            jobs.append((size, f"localmim_vit_{size}", "global", True))
    context = multiprocessing.get_context("spawn")
    for size, name, boundary, compiled in jobs:
        with context.Pool(1) as pool:
            rows.append({"size": size, **pool.apply(measure, (name, boundary, args, args.device, compiled))})
    table = pd.DataFrame(rows)
    for size, group in table.groupby("size", sort=False):
        mae = group[group["model"] == "mae"].iloc[0]
        glob = group[(group["model"] == "localmim") & (group["boundary"] == "global") & ~group["compiled"]].iloc[0]
        table.loc[group.index, "time_vs_mae"] = group["step_s"] / mae["step_s"]
        table.loc[group.index, "mem_vs_localmim_global"] = group["peak_mem_mb"] / glob["peak_mem_mb"]
    print(f"device {args.device}, batch {args.batch}, {args.img_size} px, amp {args.amp}, "
          f"median of {args.iters} steps after {args.warmup} warm-up")
    print(table.to_string(index=False, float_format="{:.3f}".format))


if __name__ == "__main__":
    main()
