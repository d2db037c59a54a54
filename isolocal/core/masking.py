"""Random masks drawn from explicit generators, and masks re-gridded to each decoder's scale.

A mask is a bool tensor (B, L) over the token grid in raster order, True = masked (hidden from
the encoder). Masks are always made outside the model and passed in, so a global and an isolated
run (or a test) can share them exactly.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def visible_count(grid: int, ratio: float, unit: int = 1) -> int:
    """Visible tokens per image of every mask drawn with these settings: int(U * (1 - ratio)) of the
    U mask units, each unit x unit tokens. Models take their keep count from here (the config), not
    from the mask's values, so selecting visible tokens never reads the mask on the host."""
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"mask_ratio must be in (0, 1), got {ratio}")
    if unit < 1 or grid % unit:
        raise ValueError(f"mask_unit {unit} must be >= 1 and divide the token grid {grid}")
    num_units = (grid // unit) ** 2
    keep = int(num_units * (1 - ratio))
    if keep < 1:
        raise ValueError(f"mask_ratio {ratio} leaves no visible unit out of {num_units}")
    return keep * unit * unit


def random_mask(batch_size: int, grid: int, ratio: float, generator: torch.Generator | None = None,
                unit: int = 1, per_batch: bool = False) -> Tensor:
    """MAE-style uniform masks: argsort of uniform noise keeps int(U * (1 - ratio)) of U units.

    `unit` is the side of a mask unit in tokens (Swin masks 32 px units = 8x8 tokens of 4 px);
    `per_batch` draws one mask and repeats it over the batch, as the published Swin code does.
    The noise is drawn on the CPU so the same generator gives the same masks on any device.
    """
    keep = visible_count(grid, ratio, unit) // (unit * unit)
    units = grid // unit
    num_units = units * units
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


def visible_indices(mask: Tensor, keep: int | None = None) -> tuple[Tensor, Tensor]:
    """(ids_keep, ids_restore): visible tokens in raster order, and the permutation back.

    Both come from a stable sort of the mask on its own device; `ids_restore` un-shuffles
    [visible..., masked...] into raster order, as in MAE. With `keep` (visible tokens per image, from
    the config: `visible_count`) no mask value is read on the host, so this never syncs a device;
    a mask with another count fails `check_visible_count`'s on-device assert. Without `keep` the count
    is read from the mask: meant for masks already on the host (Swin's window planning).
    """
    ids_shuffle = torch.argsort(mask.to(torch.uint8), dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    if keep is None:
        counts = (~mask).sum(1)
        if (counts != counts[0]).any():
            raise ValueError("every image in a batch must have the same number of visible tokens; "
                             f"got counts {sorted(set(counts.tolist()))}")
        keep = int(counts[0])
    else:
        check_visible_count(mask, keep)
    return ids_shuffle[:, :keep], ids_restore


def check_visible_count(mask: Tensor, keep: int) -> None:
    """Every row of `mask` has `keep` visible tokens, checked without a host sync.

    `torch._assert_async` raises at once on the CPU; on CUDA the check runs on the device and a
    failure surfaces as a device-side assert at the next synchronisation. Shape and dtype checks
    read no values and belong before this, where the mask enters the model.
    """
    torch._assert_async(((~mask).sum(1) == keep).all(),
                        f"every mask row must have {keep} visible (False) tokens, the count the model's "
                        "mask_ratio and mask_unit give; draw masks with model.random_mask")


def to_device(tensors: Sequence[Tensor], device: torch.device) -> list[Tensor]:
    """Tensors on `device`, host tensors copied without stalling the device stream.

    CPU -> CUDA: one pinned staging buffer per dtype and one `non_blocking` copy, then views split
    off on the device (a pageable or blocking copy would wait for the stream). Tensors already on
    `device` are returned as they are, so CPU runs copy nothing.
    """
    device = torch.device(device)
    out = list(tensors)
    todo = [i for i, t in enumerate(out) if t.device != device]
    if device.type != "cuda" or any(out[i].device.type != "cpu" for i in todo):
        return [t if i not in todo else t.to(device, non_blocking=True) for i, t in enumerate(out)]
    for dtype in {out[i].dtype for i in todo}:
        group = [i for i in todo if out[i].dtype == dtype]
        flat = torch.cat([out[i].reshape(-1) for i in group]).pin_memory().to(device, non_blocking=True)
        for i, part in zip(group, flat.split([out[i].numel() for i in group])):
            out[i] = part.view(out[i].shape)
    return out
