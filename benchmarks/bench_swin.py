"""Step time of the visible-token Swin encoder vs the dense (SimMIM-style) one, on the same batch.

Both models are LocalMIM Swin-T at 224 px with the same four local heads, targets and mask; the
only difference is the encoder: visible tokens in packed windows, or the full grid with mask
tokens. A step is forward + backward + AdamW update. Prints the median step times and their ratio,
in wall-clock seconds and in this process's CPU seconds (the steadier number on a shared machine).

    python -m benchmarks.bench_swin --batch 4 --steps 7 --threads 1
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import isolocal
from isolocal.models.swin import swin_context


def timed_step(model: isolocal.StagewiseEncoder, opt: torch.optim.Optimizer, images: torch.Tensor,
               mask: torch.Tensor) -> tuple[float, float]:
    """(wall, CPU) seconds for one forward + backward + optimizer step."""
    wall, cpu = time.perf_counter(), time.process_time()
    opt.zero_grad(set_to_none=True)
    model(images, mask).loss.backward()
    opt.step()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="localmim_swin_tiny")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads; 1 avoids OpenMP spin-waits skewing times on a shared machine")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    visible = isolocal.create_model(args.preset)
    dense = isolocal.create_model(args.preset, dense_encoder=True)
    dense.load_state_dict(visible.state_dict(), strict=False)  # same weights; dense adds a mask token
    cfg = visible.cfg
    images = torch.randn(args.batch, cfg.in_chans, cfg.img_size, cfg.img_size)
    mask = visible.random_mask(args.batch, torch.Generator().manual_seed(0))
    plans = swin_context(cfg, mask).plans
    fills = ", ".join(f"{min(p.fill for p in plan.packs.values()):.2f}" for plan in plans)
    print(f"{args.preset} batch {args.batch}, {torch.get_num_threads()} threads, "
          f"{int((~mask[0]).sum())}/{mask.shape[1]} tokens visible, packed-group fill per stage: {fills}")
    # Alternate the two models step by step so that both see the same machine load.
    runs = {"visible": visible, "dense": dense}
    opts = {name: torch.optim.AdamW(model.parameters(), lr=1e-4) for name, model in runs.items()}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for i in range(args.warmup + args.steps):
        for name, model in runs.items():
            t = timed_step(model, opts[name], images, mask)
            if i >= args.warmup:
                times[name].append(t)
    medians = {name: [statistics.median(x) for x in zip(*t)] for name, t in times.items()}
    for name, t in times.items():
        print(f"{name:8s} median step {medians[name][0]:.3f} s wall, {medians[name][1]:.3f} s CPU  "
              f"(wall per step: {', '.join(f'{w:.3f}' for w, _ in t)})")
    wall, cpu = (medians["visible"][i] / medians["dense"][i] for i in (0, 1))
    print(f"ratio visible / dense step time: {wall:.3f} (wall), {cpu:.3f} (CPU)")

if __name__ == "__main__":
    main()
