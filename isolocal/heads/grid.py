"""A stage's output as a map, for heads that pool or upsample it spatially (`dgl`, `infopro`).

A ResNet stage's (B, C, H, W) map is taken as it is. A transformer stage's tokens after its `prefix`
non-grid tokens (ViT's CLS) are the patches in raster order on the stage's square grid (ViT: img_size /
patch_size on a side at every stage; Swin: its stage's merged grid), so they fold back to (B, C, g, g).
That needs every token, which these heads declare by needing "grid": the stage plan refuses them beside
a head that needs the mask (`mim`), under which the encoder keeps the visible tokens only.
"""
from __future__ import annotations

import math

from torch import Tensor


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

