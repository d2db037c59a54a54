"""Swin attention and patch merging on visible tokens only, with windows packed into dense groups.

A masked image leaves each (shifted) window with anywhere from 0 to window^2 visible tokens.
Attention runs on *groups*: dense sequences of at most window^2 slots, each holding whole windows,
filled by first-fit-decreasing bin packing, with an additive mask that lets a token attend only to
tokens of its own window and adds Swin's relative position bias from the tokens' true coordinates. This is
the published code's knapsack packing with the window and coordinate bugs of docs/method.md §5
fixed. Every index tensor is planned once per batch (`plan_levels`), not once per block.

Shifted windows are expressed in true coordinates: with shift s, window rows are
[0, w - s), [w - s, 2w - s), ..., which is exactly timm's cyclic roll plus its region mask (a
window that wraps around the border is two windows here), so no roll and no -100 mask are needed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import PatchMerging, SwinTransformerBlock, WindowAttention
from torch import Tensor

from isolocal.core.masking import to_device, visible_indices


@dataclass(frozen=True)
class Level:
    """One Swin stage's token grid and its attention window."""

    grid: int
    window: int
    shift: int  # 0 when the window covers the whole grid (timm's rule)


@dataclass
class WindowPack:
    """Visible tokens of one level laid out in groups for one window shift.

    The leading dimension of every index is 1 (one mask shared by the batch) or the batch size.
    """

    gather: Tensor  # (Bm, groups * size): visible-token index of each slot; N (= a zero row) for padding
    scatter: Tensor  # (Bm, N): slot of each visible token
    rel_index: Tensor  # (Bm, groups, size, size): bias-table row per pair; the last row means "no attention"
    groups: int
    size: int

    @property
    def fill(self) -> float:
        """Fraction of slots holding a real token (what packing buys over one window per group)."""
        return self.scatter.shape[1] / (self.groups * self.size)


@dataclass
class LevelPlan:
    """Everything a level's blocks and its patch merging need, for one batch of masks."""

    ids_keep: Tensor  # (Bm, N): raster ids of the visible tokens, in the order the encoder holds them
    ids_restore: Tensor  # (B, grid^2): MAE-style permutation back to raster order (for the decoders)
    packs: dict[int, WindowPack]  # by shift
    merge: Tensor | None  # (Bm, N_next * 4): each next-level token's 2x2 children, in Swin's order


def take(x: Tensor, index: Tensor) -> Tensor:
    """x[b, index[b]] for x (B, N, C) and index (1 or B, M) -> (B, M, C)."""
    if index.shape[0] == 1:
        return x.index_select(1, index[0])
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _first_fit_decreasing(counts: list[int], capacity: int) -> tuple[list[tuple[int, int]], list[int]]:
    """(group, offset) of every window (windows never straddle groups) and each group's fill."""
    place, fill = [(0, 0)] * len(counts), []
    for w in sorted(range(len(counts)), key=lambda i: -counts[i]):
        if counts[w] == 0:
            break
        g = next((g for g, used in enumerate(fill) if used + counts[w] <= capacity), len(fill))
        if g == len(fill):
            fill.append(0)
        place[w] = (g, fill[g])
        fill[g] += counts[w]
    return place, fill


def _pack(ids: Tensor, level: Level, shift: int) -> WindowPack:
    """Pack the visible tokens `ids` (Bm, N) (raster ids, all on the CPU) into window groups."""
    Bm, N = ids.shape
    w = level.window
    rows, cols = ids // level.grid, ids % level.grid
    lead = (w - shift) % w  # with a shift, the first window row/column is cut to w - shift tokens
    per_side = (level.grid + lead + w - 1) // w
    wid = ((rows + lead) // w) * per_side + (cols + lead) // w
    counts = [torch.bincount(wid[b], minlength=per_side ** 2) for b in range(Bm)]
    packed = [_first_fit_decreasing(c.tolist(), w * w) for c in counts]
    groups = max(len(fill) for _, fill in packed)
    size = max(max(fill) for _, fill in packed)  # a group is only as long as the fullest one
    slots = []
    for b, (place, _) in enumerate(packed):
        start = torch.tensor([g * size + offset for g, offset in place])
        order = torch.argsort(wid[b], stable=True)
        sorted_wid = wid[b, order]
        first = torch.cumsum(counts[b], 0) - counts[b]
        slot = torch.empty(N, dtype=torch.long)
        slot[order] = start[sorted_wid] + torch.arange(N) - first[sorted_wid]
        slots.append(slot)
    total = groups * size
    scatter = torch.stack(slots)
    gather = torch.full((Bm, total), N, dtype=torch.long)
    gather.scatter_(1, scatter, torch.arange(N).expand(Bm, -1))
    # Per-slot window id and coordinates; a padding slot gets a window of its own (it attends to itself).
    slot_wid = -1 - torch.arange(total).expand(Bm, -1).clone()
    slot_wid.scatter_(1, scatter, wid)
    slot_rc = torch.zeros(Bm, total, 2, dtype=torch.long)
    slot_rc.scatter_(1, scatter.unsqueeze(-1).expand(-1, -1, 2), torch.stack([rows, cols], -1))
    slot_wid, slot_rc = slot_wid.view(Bm, groups, size), slot_rc.view(Bm, groups, size, 2)
    d = slot_rc.unsqueeze(3) - slot_rc.unsqueeze(2) + (w - 1)  # (Bm, groups, size, size, 2)
    rel = d[..., 0] * (2 * w - 1) + d[..., 1]
    same = slot_wid.unsqueeze(3) == slot_wid.unsqueeze(2)
    rel_index = torch.where(same, rel, torch.full_like(rel, (2 * w - 1) ** 2))
    return WindowPack(gather, scatter, rel_index, groups, size)


def _check_aligned(mask: Tensor, grid: int) -> Tensor:
    """The mask at half resolution; every 2x2 neighbourhood must be all visible or all masked."""
    m = mask.view(mask.shape[0], grid // 2, 2, grid // 2, 2)
    coarse_any, coarse_all = m.any(4).any(2), m.all(4).all(2)
    if not torch.equal(coarse_any, coarse_all):
        raise ValueError(f"mask is not aligned to the patch merging at the {grid}x{grid} grid: a 2x2 "
                         "neighbourhood is partly masked; draw masks with model.random_mask (mask_unit)")
    return coarse_any.flatten(1)


def plan_levels(mask: Tensor, levels: list[Level], device: torch.device | None = None) -> list[LevelPlan]:
    """Index tensors for every level of a (B, grid0^2) bool mask (True = masked), on `device` (default:
    the mask's).

    Planning (bin packing) reads the mask, so it runs on the host: pass the mask while it is still
    there (a device mask is copied back first, which waits for the device). The plans then reach the
    device in one non-blocking copy from pinned memory (`to_device`), not one blocking copy per index.
    """
    B, device = mask.shape[0], mask.device if device is None else torch.device(device)
    if mask.device.type != "cpu":
        mask = mask.cpu()
    shared = bool((mask == mask[:1]).all())
    m = mask[:1] if shared else mask
    plans = []
    for i, level in enumerate(levels):
        ids_keep, ids_restore = visible_indices(m)
        packs = {s: _pack(ids_keep, level, s) for s in sorted({0, level.shift})}
        merge = None
        if i + 1 < len(levels):
            m = _check_aligned(m, level.grid)
            next_ids, _ = visible_indices(m)
            r, c = next_ids // (level.grid // 2) * 2, next_ids % (level.grid // 2) * 2
            children = torch.stack([r * level.grid + c, (r + 1) * level.grid + c,
                                    r * level.grid + c + 1, (r + 1) * level.grid + c + 1], -1)
            merge = torch.gather(ids_restore, 1, children.flatten(1))
        plans.append(LevelPlan(ids_keep, ids_restore, packs, merge))
    return _to(plans, B, device)


def _to(plans: list[LevelPlan], batch: int, device: torch.device) -> list[LevelPlan]:
    """Every plan's index tensors on `device` in one transfer; `ids_restore` expanded to the batch there."""
    tensors = [t for p in plans for t in _indices(p)]
    moved = iter(to_device(tensors, device))
    out = []
    for p in plans:
        ids_keep, ids_restore = next(moved), next(moved)
        packs = {s: WindowPack(next(moved), next(moved), next(moved), pack.groups, pack.size)
                 for s, pack in p.packs.items()}
        merge = None if p.merge is None else next(moved)
        out.append(LevelPlan(ids_keep, ids_restore.expand(batch, -1), packs, merge))
    return out


def _indices(plan: LevelPlan) -> list[Tensor]:
    """A plan's tensors in the order `_to` reads them back."""
    packs = [t for pack in plan.packs.values() for t in (pack.gather, pack.scatter, pack.rel_index)]
    return [plan.ids_keep, plan.ids_restore, *packs] + ([] if plan.merge is None else [plan.merge])


def packed_window_attention(attn: WindowAttention, x: Tensor, pack: WindowPack) -> Tensor:
    """timm's WindowAttention (same weights) over the visible tokens x (B, N, C), by groups."""
    B, G, S, H = x.shape[0], pack.groups, pack.size, attn.num_heads
    xp = take(F.pad(x, (0, 0, 0, 1)), pack.gather)  # (B, G*S, C), padding slots read a zero row
    q, k, v = attn.qkv(xp).view(B, G, S, 3, H, -1).permute(3, 0, 1, 4, 2, 5).flatten(2, 3).unbind(0)
    table = attn.relative_position_bias_table
    table = torch.cat([table, table.new_full((1, H), float("-inf"))])
    bias = table[pack.rel_index].permute(0, 1, 4, 2, 3).flatten(1, 2)  # (Bm, G*H, S, S)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype),
                                         dropout_p=attn.attn_drop.p if attn.training else 0.0)
    out = out.view(B, G, H, S, -1).permute(0, 1, 3, 2, 4).reshape(B, G * S, -1)
    return attn.proj_drop(attn.proj(take(out, pack.scatter)))


def visible_block(block: SwinTransformerBlock, x: Tensor, pack: WindowPack) -> Tensor:
    """A timm Swin block on visible tokens (B, N, C): same weights, same maths as on the full grid."""
    x = x + block.drop_path1(packed_window_attention(block.attn, block.norm1(x), pack))
    return x + block.drop_path2(block.mlp(block.norm2(x)))


def visible_merge(merge: PatchMerging, x: Tensor, index: Tensor) -> Tensor:
    """timm's PatchMerging on visible 2x2 neighbourhoods: (B, N, C) -> (B, N / 4, out_dim)."""
    B, _, C = x.shape
    return merge.reduction(merge.norm(take(x, index).view(B, -1, 4 * C)))
