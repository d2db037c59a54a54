"""What each local head costs beside the stages it trains: parameters and forward FLOPs, summed over a
model's stages, for one training sample (both views of it for `contrastive`; the masked image for
`mim`, whose encoder reads the visible tokens only). docs/heads.md quotes its output.

Run from the repository root of a plain checkout (no install needed; a few seconds on a CPU):

    python -m benchmarks.head_cost                                  # resnet32_k4 and localmim_vit_nano
    python -m benchmarks.head_cost --presets resnet110_k8 localmim_vit_micro
"""
from __future__ import annotations

import argparse

import pandas as pd
import torch
from torch.utils.flop_counter import FlopCounterMode

import isolocal

HEADS = ("mim", "classify", "contrastive", "dgl", "infopro", "auglocal", "man")


def flops(fn, *args) -> tuple[object, int]:
    with FlopCounterMode(display=False) as counter:
        out = fn(*args)
    return out, counter.get_total_flops()


@torch.no_grad()
def head_cost(preset: str, head: str) -> dict:
    """Parameters and forward FLOPs of the stages (encoder) and of their heads, for one sample."""
    torch.manual_seed(0)
    model = isolocal.create_model(preset, objective=head).eval()
    cfg = model.cfg
    images = torch.randn(model.views, cfg.in_chans, cfg.img_size, cfg.img_size)
    mask = model.random_mask(model.views, generator=torch.Generator().manual_seed(0))
    batch = model.prepare(images, mask, labels=torch.zeros(1, dtype=torch.long))
    row = {"preset": preset, "head": head, "stage_params": 0, "head_params": 0, "stage_mflops": 0.0,
           "head_mflops": 0.0}
    x = images
    for k, stage in enumerate(model.stages):
        own = [p.numel() for name, p in stage.named_parameters() if name.startswith(("head.", "decoder."))]
        row["head_params"] += sum(own)
        row["stage_params"] += sum(p.numel() for p in stage.parameters()) - sum(own)
        out, encoder = flops(stage, x, batch.ctx)
        _, whole = flops(model.stage_step, k, x, batch)
        row["stage_mflops"] += encoder / 1e6
        row["head_mflops"] += (whole - encoder) / 1e6
        x = out
    row["params_ratio"] = row["head_params"] / row["stage_params"]
    row["flops_ratio"] = row["head_mflops"] / row["stage_mflops"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["resnet32_k4", "localmim_vit_nano"])
    args = parser.parse_args()
    rows = [head_cost(preset, head) for preset in args.presets for head in HEADS
            if head != "mim" or isolocal.preset_config(preset).arch != "resnet"]  # a ResNet has no MIM decoder
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.3g}"))


if __name__ == "__main__":
    main()
