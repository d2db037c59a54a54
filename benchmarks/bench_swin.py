"""Step time of the visible-token Swin encoder vs the dense (SimMIM-style) one, on the same batch.

Both models are LocalMIM Swin-T at 224 px with the same four local heads, targets and mask; the
only difference is the encoder: visible tokens in packed windows, or the full grid with mask
tokens. A step is forward + backward + AdamW update. Prints the median step times and their ratio.

    OMP_NUM_THREADS=2 python -m benchmarks.bench_swin --batch 4 --steps 5
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import isolocal
from isolocal.models.swin import swin_context


def timed_step(model: isolocal.LocalMIM, opt: torch.optim.Optimizer, images: torch.Tensor,
               mask: torch.Tensor) -> float:
    """Seconds for one forward + backward + optimizer step."""
    start = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    model(images, mask).loss.backward()
    opt.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="localmim_swin_tiny")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()

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
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(args.warmup + args.steps):
        for name, model in runs.items():
            t = timed_step(model, opts[name], images, mask)
            if i >= args.warmup:
                times[name].append(t)
    results = {name: statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        print(f"{name:8s} median step {results[name]:.3f} s  (steps: {', '.join(f'{x:.3f}' for x in t)})")
    print(f"ratio visible / dense step time: {results['visible'] / results['dense']:.3f}")


if __name__ == "__main__":
    main()
