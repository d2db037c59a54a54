"""Fixed 2-D sin-cos position embeddings (timm's builder) with MAE's all-zero CLS row."""
from __future__ import annotations

import torch
from timm.layers import build_sincos2d_pos_embed
from torch import Tensor


def sincos_pos_embed(dim: int, grid: int, cls_token: bool = True) -> Tensor:
    """(1, [1 +] grid*grid, dim) fixed embedding; the CLS position (if any) is all zeros."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    pos = build_sincos2d_pos_embed([grid, grid], dim)
    if cls_token:
        pos = torch.cat([torch.zeros(1, dim), pos], dim=0)
    return pos.unsqueeze(0)
