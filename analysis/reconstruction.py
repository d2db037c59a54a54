"""What each stage reconstructs: every local decoder's prediction on its own cell grid.

``reconstruct(model, images, mask)`` runs the model's own per-stage step (``StagewiseEncoder.prepare`` and
``StagewiseEncoder.stage_step``, the code every trainer runs), so the targets, predictions, loss weights and
losses it returns are the training loss's by construction, not a re-implementation of it. The
masked-cell error of a stage is that stage's loss (``masked_mse``); per image it is the loss the
model would report for that image alone.

``analysis.reconstruction_figure.save_reconstruction`` writes, for one run, the figure (one row per
image: input, masked input, then per stage the target at that stage's cell size and the prediction on
masked cells with the visible cells pasted back) and a CSV of the per-stage masked-cell errors.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from analysis.glyphs import CHANNEL_MODES
from isolocal.core.masking import regrid
from isolocal.models.encoder import StagewiseEncoder, masked_mse


@dataclass
class StageReconstruction:
    """One stage's local reconstruction of a batch, on that stage's cell grid (row-major cells)."""

    stage: int
    tap: int  # 0-based encoder block (ViT) or Swin stage the decoder reads
    cell: int  # target cell side in pixels
    grid: int  # cells per side
    target: Tensor  # (B, grid*grid, dim), from the model's TargetBank
    pred: Tensor  # (B, grid*grid, dim), the stage decoder's output
    weight: Tensor  # (B, grid*grid), the loss weight: 1 = masked cell, fractional when pooled, 0 = visible
    loss: Tensor  # the model's local loss on the whole batch (masked-cell MSE)

    def errors(self) -> Tensor:
        """Masked-cell MSE per image: each image's own stage loss, (B,)."""
        return torch.stack([masked_mse(self.pred[i:i + 1], self.target[i:i + 1], self.weight[i:i + 1])
                            for i in range(self.pred.shape[0])])


@torch.no_grad()
def reconstruct(model: StagewiseEncoder, images: Tensor, mask: Tensor) -> list[StageReconstruction]:
    """Per-stage (target, prediction, weight) of ``model`` on normalized ``images`` (B, C, H, W) under
    ``mask`` (B, tokens) bool, True = masked, for every stage whose head is ``mim``.
    Runs in eval mode (no drop-path); restores the mode."""
    training = model.training
    model.eval()
    try:
        images = images.to(next(model.parameters()).device)
        batch = model.prepare(images, mask)  # moves the mask itself (Swin plans windows from the host copy)
        x, out = images, []
        for k, tap in enumerate(model.taps):
            if not model.plan.reconstructs(k):  # a classify / contrastive head reconstructs nothing
                x = model.stages[k](x, batch.ctx)
                continue
            x, loss, pred, _ = model.stage_step(k, x, batch)
            out.append(StageReconstruction(k, tap.index, tap.cell, tap.out_grid, batch.targets[k],
                                           pred.float(), batch.weights[k], loss))
        return out
    finally:
        model.train(training)


def error_table(recs: list[StageReconstruction], names: list[str], target: str) -> pd.DataFrame:
    """One row per image and stage (``index`` = the image's position), plus per stage one row over the
    whole batch (``index`` -1, image ``batch``) whose error is the model's loss on the batch."""
    rows = []
    for rec in recs:
        common = {"stage": rec.stage, "tap": rec.tap, "cell_px": rec.cell, "grid": rec.grid, "target": target}
        for index, (name, err, w) in enumerate(zip(names, rec.errors().tolist(), rec.weight.sum(dim=1).tolist())):
            rows.append({"index": index, "image": name, **common, "masked_cells": w, "masked_cell_error": err})
        rows.append({"index": -1, "image": "batch", **common, "masked_cells": rec.weight.sum().item(),
                     "masked_cell_error": rec.loss.item()})
    return pd.DataFrame(rows)


# ---- pixel targets back to image space -----------------------------------------------------------

def unpatchify(cells: Tensor, grid: int, cell: int, in_chans: int) -> Tensor:
    """(B, grid*grid, cell*cell*C) in ``isolocal.core.targets.pixels``' layout -> (B, C, H, W)."""
    x = cells.reshape(cells.shape[0], grid, grid, cell, cell, in_chans)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(cells.shape[0], in_chans, grid * cell, grid * cell)


def cell_stats(images: Tensor, cell: int) -> tuple[Tensor, Tensor]:
    """Each cell's mean and ``sqrt(var + 1e-6)`` (unbiased var over its pixels and channels), the
    statistics the normalized-pixel target divides out, as (B, 1, H, W) maps for un-normalizing."""
    x = images.double()
    n = cell * cell * x.shape[1]
    if n < 2:
        raise ValueError(f"a {cell} px cell of {x.shape[1]} channel(s) has one value: no per-cell variance")
    mean = F.avg_pool2d(x, cell).mean(dim=1, keepdim=True)
    var = (F.avg_pool2d(x * x, cell).mean(dim=1, keepdim=True) - mean * mean).clamp_min(0) * n / (n - 1)
    stats = torch.cat([mean, (var + 1e-6).sqrt()], dim=1).repeat_interleave(cell, 2).repeat_interleave(cell, 3)
    return stats[:, :1], stats[:, 1:]


def pixel_mask(model: StagewiseEncoder, mask: Tensor) -> Tensor:
    """The token mask at image resolution, (B, 1, H, W) float, 1 = masked pixel."""
    size = model.img_size
    return regrid(mask, model.mask_grid, size // model.mask_grid).reshape(mask.shape[0], 1, size, size)


def pixel_views(rec: StageReconstruction, images: Tensor, masked: Tensor) -> dict[str, Tensor]:
    """A pixel-target stage as (B, C, H, W) images, visible pixels pasted back as MAE's visualisation:
    ``target`` and ``pred`` in normalized units (each cell's own zero mean, unit variance), and
    ``pred_stats``: the prediction times each cell's own std plus its mean (the input's normalization)."""
    C = images.shape[1]
    target = unpatchify(rec.target, rec.grid, rec.cell, C).double()
    pred = unpatchify(rec.pred, rec.grid, rec.cell, C).double()
    mean, std = cell_stats(images, rec.cell)
    masked = masked.double()
    return {
        "target": target,
        "pred": target * (1 - masked) + pred * masked,
        "pred_stats": images.double() * (1 - masked) + (pred * std + mean) * masked,
    }


# ---- options of `isolocal analyze reconstruct` ------------------------------------

def check_options(mask_seed: int, hog_channels: str) -> None:
    """Bad options fail before any checkpoint is read."""
    if not isinstance(mask_seed, int) or mask_seed < 0:
        raise ValueError(f"mask seed must be an integer >= 0, got {mask_seed!r}")
    if hog_channels not in CHANNEL_MODES:
        raise ValueError(f"hog channels must be one of {', '.join(CHANNEL_MODES)}, got {hog_channels!r}")

