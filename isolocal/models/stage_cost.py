"""Per-stage cost of a model: blocks, parameters, forward FLOPs and time, and the report `isolocal info` prints."""
from __future__ import annotations

import statistics
import time

import pandas as pd
import torch
from torch.utils.flop_counter import FlopCounterMode

from isolocal.config import RunConfig
from isolocal.core.device import resolve_device
from isolocal.models.encoder import StagewiseEncoder


def stage_table(cfg: RunConfig, repeats: int = 5) -> pd.DataFrame:
    """One row per stage: its tap (block or Swin stage index), encoder blocks, parameters (encoder and
    local head), forward FLOPs, the bytes of its output and, unless `repeats` = 0, the median forward
    time over `repeats` calls, for one masked training image on `train.device` (the work a stage does
    per image in pre-training; both views of it with a contrastive head)."""
    if repeats < 0:
        raise ValueError(f"repeats must be >= 0 (0 = counted, not timed), got {repeats}")
    device = resolve_device(cfg.train.device)
    model = StagewiseEncoder(cfg.model).to(device).eval()
    m = cfg.model
    views = model.views  # a contrastive head compares two views: one image is then a pair
    images = torch.randn(views, m.in_chans, m.img_size, m.img_size, device=device)
    batch = model.prepare(images, model.random_mask(views, generator=torch.Generator().manual_seed(0)),
                          labels=torch.zeros(1, dtype=torch.long, device=device))
    rows, x = [], images
    with torch.no_grad():
        for k, (stage, tap) in enumerate(zip(model.stages, model.taps)):
            with FlopCounterMode(display=False) as counter:
                out = model.stage_step(k, x, batch)[0]
            times = []
            for _ in range(repeats + 1 if repeats else 0):  # the first call warms up and is not counted
                t0 = time.perf_counter()
                model.stage_step(k, x, batch)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            head = sum(p.numel() for name, p in stage.named_parameters() if name.startswith(("decoder.", "head.", "norm.")))
            total = sum(p.numel() for p in stage.parameters())
            blocks = sum(type(mod).__name__.endswith("Block") for name, mod in stage.named_modules()
                         if not name.startswith(("decoder", "head")))  # timm's ViT Block / SwinTransformerBlock
            rows.append({"stage": k, "tap": tap.index, "blocks": blocks, "scale": tap.scale,
                         "target_cell": tap.cell, "params_encoder": total - head, "params_head": head,
                         "gflops": counter.get_total_flops() / 1e9, "out_bytes": out.numel() * out.element_size(),
                         **({"fwd_ms": 1e3 * statistics.median(times[1:])} if repeats else {})})
            x = out
    return pd.DataFrame(rows)


def stage_report(cfg: RunConfig, repeats: int = 5) -> str:
    """What `isolocal info` prints about `cfg`'s model: a line on its shape, `stage_table` and the totals
    (with `repeats` = 0 counted only, not timed)."""
    table = stage_table(cfg, repeats)
    m = cfg.model
    shape = (f"{m.block} blocks {m.depths}, channels {m.channels}, {m.stem} stem" if m.arch == "resnet" else
             f"patch {m.patch_size}, {m.embed_dim}-d, depth {m.depth}, target {m.target}")
    totals = table.drop(columns=["out_bytes"]).sum()
    timed = f", {totals.fwd_ms:.4g} ms" if repeats else " (--measure also times each stage)"
    return "\n".join([
        f"{cfg.preset}: {m.arch} {m.img_size}px {shape}, boundary {m.boundary}, objective {m.objective}, "
        f"mask ratio {m.mask_ratio}",
        f"per stage, one masked training image on {resolve_device(cfg.train.device).type} "
        "(FLOPs counted by torch.utils.flop_counter):",
        table.to_string(index=False, float_format=lambda v: f"{v:.4g}"),
        f"total: {int(totals.params_encoder + totals.params_head):,} parameters, {totals.gflops:.4g} GFLOPs{timed}",
    ])
