"""A stage's output as a map, for heads that pool or upsample it spatially (`dgl`, `infopro`).

A ResNet stage's (B, C, H, W) map is taken as it is. A transformer stage's tokens after its `prefix`
non-grid tokens (ViT's CLS) are the patches in raster order on the stage's square grid (ViT: img_size /
patch_size on a side at every stage; Swin: its stage's merged grid), so they fold back to (B, C, g, g).
That needs every token: under a mask the encoder keeps the visible ones only, so these heads refuse a
model in which some head needs the mask (`mim`), before any work.
"""
from __future__ import annotations

import math

from torch import Tensor

from isolocal.config import ModelConfig
from isolocal.heads.base import HEADS, parse_objectives


def as_map(features: Tensor, prefix: int, head: str) -> Tensor:
    """(B, C, H, W) maps as they are; (B, prefix + g * g, C) tokens -> (B, C, g, g) on their patch grid."""
    if features.dim() == 4:
        return features
    tokens = features[:, prefix:]
    batch, count, dim = tokens.shape
    side = math.isqrt(count)
    if side * side != count:
        raise ValueError(f"the {head} head lays a stage's tokens out on their square patch grid, got {count} "
                         f"tokens after {prefix} non-grid ones, which is not a square")
    return tokens.transpose(1, 2).reshape(batch, dim, side, side)


def require_whole_grid(cfg: ModelConfig, head: str) -> None:
    """Refuse a model in which some head needs the mask: its encoder would read visible tokens only, and
    `head` needs the whole grid (`as_map`)."""
    objectives = parse_objectives(cfg.objective, len(cfg.taps), skip_missing=True)
    masked = [k for k, name in enumerate(objectives) if name in HEADS and "mask" in HEADS[name].needs]
    if masked:
        names = " / ".join(sorted({repr(objectives[k]) for k in masked}))
        raise ValueError(f"model.objective {head!r} lays each stage's tokens out on the whole patch grid, but "
                         f"{names} (stages {masked}) needs a mask, under which the encoder reads visible tokens "
                         f"only; combine {head!r} with heads that need no mask")
