"""Fixed 2-D sin-cos position embeddings (timm's builder) with MAE's all-zero CLS row.

timm's table holds the same values as MAE's `get_2d_sincos_pos_embed` (the one LocalMIM publishes),
in another channel order: timm lays a width `dim` out as [sin(row), sin(col), cos(row), cos(col)],
MAE as [sin(col), cos(col), sin(row), cos(row)], each block dim/4 wide with frequencies
10000^(-i / (dim/4)). isolocal keeps timm's order (docs/method.md §9 says why);
`mae_channel_order` is the permutation between the two.
"""
from __future__ import annotations

import torch
from timm.layers import build_sincos2d_pos_embed
from torch import Tensor

# Block b of timm's layout is block _MAE_BLOCK[b] of MAE's: sin(row), sin(col), cos(row), cos(col).
_MAE_BLOCK = (2, 0, 3, 1)


def _check_dim(dim: int) -> None:
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")


def sincos_pos_embed(dim: int, grid: int, cls_token: bool = True) -> Tensor:
    """(1, [1 +] grid*grid, dim) fixed embedding; the CLS position (if any) is all zeros."""
    _check_dim(dim)
    pos = build_sincos2d_pos_embed([grid, grid], dim)
    if cls_token:
        pos = torch.cat([torch.zeros(1, dim), pos], dim=0)
    return pos.unsqueeze(0)


def mae_channel_order(dim: int) -> Tensor:
    """Index p with `sincos_pos_embed(dim, g)[..., j] == mae_table[..., p[j]]` for every j: the channel
    of MAE's layout that each channel of isolocal's (timm's) layout is."""
    _check_dim(dim)
    q = dim // 4
    return torch.cat([torch.arange(b * q, (b + 1) * q) for b in _MAE_BLOCK])
