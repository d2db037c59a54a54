"""Attention metrics of docs/method.md §8: query/key NMI and mean attention distance.

Both work on patch-to-patch attention: prefix (CLS) rows and columns are dropped, 1e-8 is added
and rows are renormalized, all in float64 so that NMI near 0 or 1 is not lost to rounding.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from analysis.capture import TokenLayout


def patch_attention(attn: Tensor, num_prefix_tokens: int = 1) -> Tensor:
    """Float64 patch-to-patch attention: prefix rows/cols dropped, +1e-8, rows renormalized."""
    a = attn[..., num_prefix_tokens:, num_prefix_tokens:].double() + 1e-8
    return a / a.sum(dim=-1, keepdim=True)


def check_attention(attn: Tensor, name: str = "attention") -> None:
    """Attention maps (B, H, N, N) of non-negative rows that sum to 1 (softmax outputs): a 3-D (H, N, N)
    map would be read as H images of one head, and anything else gives a number that means nothing."""
    if not isinstance(attn, Tensor) or attn.dim() != 4 or attn.shape[-1] != attn.shape[-2]:
        shape = tuple(attn.shape) if isinstance(attn, Tensor) else type(attn).__name__
        raise ValueError(f"{name} must have shape (images, heads, tokens, tokens), got {shape}; add the image "
                         "axis with attn.unsqueeze(0) for one image")
    if not attn.is_floating_point():
        raise ValueError(f"{name} must be floating-point softmax weights, got {attn.dtype}")
    if bool((attn < 0).any()):
        raise ValueError(f"{name} must be non-negative (softmax weights), got a minimum of {attn.min().item():.4g}")
    sums = attn.double().sum(dim=-1)
    tolerance = 1e-3 if attn.dtype in (torch.float32, torch.float64) else 2e-2  # half-precision rows round
    worst = (sums - 1).abs().max().item()
    if worst > tolerance:
        raise ValueError(f"{name} rows must sum to 1 (softmax weights over the keys), one is off by {worst:.3g}")


def nmi(attn: Tensor, num_prefix_tokens: int = 1) -> Tensor:
    """Query/key normalized mutual information per head (H,) of attention (B, H, N, N).

    p(q) = 1/N, p(k) = sum_q p(q) A[q,k], MI = sum_q sum_k p(q) A log(A / p(k)),
    NMI = MI / sqrt(H(q) H(k)) per image and head, then averaged over images. Near 0 means every
    query attends alike (collapse); near 1 means attention is a function of the query.
    """
    check_attention(attn)
    a = patch_attention(attn, num_prefix_tokens)
    n = a.shape[-1]
    p_k = a.mean(dim=-2)  # (B, H, N): p(q) = 1/N is uniform
    mi = (a * torch.log(a / p_k.unsqueeze(-2))).sum(dim=(-2, -1)) / n
    h_q = np.log(n)
    h_k = -(p_k * torch.log(p_k)).sum(dim=-1)
    return (mi / torch.sqrt(h_q * h_k)).mean(dim=0)


def patch_centres(grid: tuple[int, int], patch: int | tuple[int, int]) -> Tensor:
    """Pixel (y, x) centres of a row-major patch grid, shape (gh * gw, 2), float64."""
    ph, pw = (patch, patch) if isinstance(patch, int) else patch
    rows, cols = torch.meshgrid(
        torch.arange(grid[0], dtype=torch.float64), torch.arange(grid[1], dtype=torch.float64), indexing="ij"
    )
    return torch.stack([(rows.flatten() + 0.5) * ph, (cols.flatten() + 0.5) * pw], dim=-1)


def attention_distance(
    attn: Tensor, grid: tuple[int, int], patch: int | tuple[int, int], num_prefix_tokens: int = 1
) -> Tensor:
    """Mean attention distance in pixels per head (H,): mean over images and queries of
    sum_k A[q,k] * ||centre(q) - centre(k)||, on the renormalized patch-to-patch attention."""
    check_attention(attn)
    a = patch_attention(attn, num_prefix_tokens)
    if a.shape[-1] != grid[0] * grid[1]:
        raise ValueError(f"{a.shape[-1]} patch tokens do not fill grid {grid}")
    centres = patch_centres(grid, patch).to(a.device)
    dist = torch.cdist(centres, centres)
    return (a * dist).sum(dim=-1).mean(dim=(0, 2))


def layer_table(
    attn_layers: Sequence[Tensor],
    grid: tuple[int, int],
    patch: int | tuple[int, int],
    num_prefix_tokens: int = 1,
) -> pd.DataFrame:
    """One row per layer (1-based ``layer``): head-mean ``nmi`` and ``attention_distance``, plus the
    per-head values as lists in ``nmi_heads`` and ``attention_distance_heads``."""
    return layout_table(attn_layers, [TokenLayout(num_prefix_tokens, grid, patch)] * len(attn_layers))


def layout_table(attn_layers: Sequence[Tensor], layouts: Sequence[TokenLayout]) -> pd.DataFrame:
    """``layer_table`` with one token layout per layer (Swin: each layer's own window grid and patch)."""
    rows = []
    for layer, (attn, layout) in enumerate(zip(attn_layers, layouts, strict=True), start=1):
        per_head_nmi = nmi(attn, layout.num_prefix_tokens).cpu()
        per_head_dist = attention_distance(attn, layout.grid, layout.patch, layout.num_prefix_tokens).cpu()
        rows.append(
            {
                "layer": layer,
                "nmi": per_head_nmi.mean().item(),
                "attention_distance": per_head_dist.mean().item(),
                "nmi_heads": per_head_nmi.tolist(),
                "attention_distance_heads": per_head_dist.tolist(),
            }
        )
    return pd.DataFrame(rows)
