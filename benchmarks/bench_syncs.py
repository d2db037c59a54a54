"""Host synchronisations per training step, global and isolated, ViT and Swin.

A step is what the trainer runs between log steps: a mask drawn on the host, `backward_step` and the
optimizer step (AdamW). Over `--steps` steps after `--warmup`, per step:
- `fwd_bwd_*` (`backward_step`) and `opt_*` (the optimizer step): events of
  `isolocal.testing.syncs.HostSyncCounter`: every host read (`all`), those of floating-point tensors
  (`float`) and those of tensors on the accelerator (`device`). On a CPU run every tensor is a host
  tensor, so `device` is 0 there and `all` is the upper bound the CPU tests guard (ViT 0; Swin only
  its host-side window planning, on integer data). AdamW reads its step counts, CPU scalars even on
  a GPU run (`capturable=False`), so its reads are host-only;
- `cuda_sync_warnings` (CUDA only): the synchronising calls `torch.cuda.set_sync_debug_mode("warn")`
  reports for the whole step (blocking `.item()`, device-to-host copies, `nonzero`, stream syncs).

Run from the repository root of a plain checkout (no install needed):

    python -m benchmarks.bench_syncs                                         # CPU, nano presets
    python -m benchmarks.bench_syncs --device cuda --amp bf16 --batch 64 \\
        --presets localmim_vit_base,localmim_swin_tiny
"""
from __future__ import annotations

import argparse
import contextlib
import warnings

import pandas as pd
import torch

import isolocal
from isolocal.testing.syncs import HostSyncCounter
from isolocal.train.step import backward_step


def measure(name: str, boundary: str, args: argparse.Namespace) -> dict:
    """Sync counts per step of one preset in one boundary mode."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = isolocal.create_model(name, boundary=boundary).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, model.cfg.in_chans, model.img_size, model.img_size, device=device)
    dtype = {"bf16": torch.bfloat16, "off": None}[args.amp]
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext

    counters = {"fwd_bwd": HostSyncCounter(), "opt": HostSyncCounter()}

    def step(count: bool = False) -> None:
        opt.zero_grad(set_to_none=True)
        mask = model.random_mask(args.batch, generator=gen)
        with counters["fwd_bwd"] if count else contextlib.nullcontext():
            backward_step(model, images, mask, autocast=autocast)
        with counters["opt"] if count else contextlib.nullcontext():
            opt.step()

    for _ in range(args.warmup):
        step()
    for _ in range(args.steps):
        step(count=True)
    row = {"model": name, "boundary": boundary}
    for part, counter in counters.items():
        row.update({f"{part}_all": len(counter) / args.steps, f"{part}_float": len(counter.floating()) / args.steps,
                    f"{part}_device": len(counter.on_device()) / args.steps})
    row["cuda_sync_warnings"] = float("nan")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for _ in range(args.steps):
                    step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        row["cuda_sync_warnings"] = sum("synchroniz" in str(w.message) for w in caught) / args.steps
        if caught and args.verbose:
            for message in sorted({str(w.message).splitlines()[0] for w in caught}):
                print(f"  {name} {boundary}: {message}")
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="localmim_vit_nano,localmim_swin_nano", help="comma list of presets")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--amp", choices=("off", "bf16"), default="off")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--verbose", action="store_true", help="print each distinct CUDA sync warning")
    args = parser.parse_args(argv)
    rows = [measure(name, boundary, args) for name in args.presets.split(",") for boundary in ("global", "isolated")]
    print(f"host syncs per training step (backward_step + AdamW step), device {args.device}, batch {args.batch}, "
          f"amp {args.amp}, mean of {args.steps} steps after {args.warmup} warm-up")
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.3g}"))


if __name__ == "__main__":
    main()
