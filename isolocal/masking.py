"""Random masks drawn from explicit generators, and masks re-gridded to each decoder's scale.

A mask is a bool tensor (B, L) over the token grid in raster order, True = masked (hidden from
the encoder). Masks are always made outside the model and passed in, so a global and an isolated
run (or a test) can share them exactly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def random_mask(batch_size: int, grid: int, ratio: float, generator: torch.Generator | None = None,
                unit: int = 1, per_batch: bool = False) -> Tensor:
    """MAE-style uniform masks: argsort of uniform noise keeps int(U * (1 - ratio)) of U units.

    `unit` is the side of a mask unit in tokens (Swin masks 32 px units = 8x8 tokens of 4 px);
    `per_batch` draws one mask and repeats it over the batch, as the published Swin code does.
    The noise is drawn on the CPU so the same generator gives the same masks on any device.
    """
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"mask_ratio must be in (0, 1), got {ratio}")
    if unit < 1 or grid % unit:
        raise ValueError(f"mask_unit {unit} must be >= 1 and divide the token grid {grid}")
    units = grid // unit
    num_units = units * units
    keep = int(num_units * (1 - ratio))
    if keep < 1:
        raise ValueError(f"mask_ratio {ratio} leaves no visible unit out of {num_units}")
    draws = 1 if per_batch else batch_size
    noise = torch.rand(draws, num_units, generator=generator)
    ids = torch.argsort(noise, dim=1)
    mask = torch.ones(draws, num_units, dtype=torch.bool)
    mask.scatter_(1, ids[:, :keep], False)
    mask = mask.reshape(draws, units, units)
    mask = mask.repeat_interleave(unit, 1).repeat_interleave(unit, 2).reshape(draws, grid * grid)
    return mask.expand(batch_size, -1).contiguous() if per_batch else mask


def regrid(mask: Tensor, grid: int, scale: float) -> Tensor:
    """Mask (B, grid*grid) at another scale, as float: replicate for scale >= 1, mean for < 1."""
    B = mask.shape[0]
    m = mask.float().reshape(B, 1, grid, grid)
    if scale >= 1:
        s = int(scale)
        m = m.repeat_interleave(s, 2).repeat_interleave(s, 3)
    else:
        k = int(round(1 / scale))
        m = F.avg_pool2d(m, k, k)
    return m.flatten(1)


def visible_indices(mask: Tensor) -> tuple[Tensor, Tensor]:
    """(ids_keep, ids_restore): visible tokens in raster order, and the permutation back.

    `ids_restore` un-shuffles [visible..., masked...] into raster order, as in MAE.
    """
    counts = (~mask).sum(1)
    if (counts != counts[0]).any():
        raise ValueError("every image in a batch must have the same number of visible tokens; "
                         f"got counts {sorted(set(counts.tolist()))}")
    ids_shuffle = torch.argsort(mask.to(torch.uint8), dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    return ids_shuffle[:, : int(counts[0])], ids_restore
