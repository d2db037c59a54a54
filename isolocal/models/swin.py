"""Pyramidal Swin encoder split into stages at the taps, running on visible tokens only.

Swin stage s (timm's `layers.s`) is a run of blocks at grid g / 2^s; a tap after Swin stage s < last
reads the tokens after the *next* stage's patch merging (docs/method.md §5: dims 2C, 4C, 8C, 8C,
grids 28, 14, 7, 7 at 224 px), the last tap reads the last stage. So a LocalMIM stage owns Swin
stages taps[k-1]+1 .. taps[k], each with the patch merging that follows it (except the last), and
stage 0 also owns the patch embedding. Inside a stage, `layers.i.blocks` are timm's
`layers.{s}.blocks` and `layers.i.downsample` is timm's `layers.{s+1}.downsample`, so export to
timm is a renaming and full-image features equal timm's `forward_features`.

With a mask, the encoder holds only the visible tokens (B, N, C) in raster order and uses
`swin_attention`; without one (features, analysis) or for the SimMIM-style dense encoder it runs
timm's own block on the full grid.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from timm.layers import PatchEmbed, calculate_drop_path_rates
from timm.models.swin_transformer import PatchMerging, SwinTransformerBlock
from torch import Tensor, nn

from isolocal.config import ModelConfig
from isolocal.heads.base import HeadType, attach_head
from isolocal.heads.plan import StagePlan
from isolocal.models.decoder import LocalDecoder
from isolocal.models.family import Family, Tap, check_common, make_tap, per_tap, require
from isolocal.models.recompute import run_blocks
from isolocal.models.swin_attention import Level, LevelPlan, plan_levels, take, visible_block, visible_merge
from isolocal.models.timm_export import timm_name_and_kwargs, timm_pool_kwargs, timm_state_dict
from isolocal.core.targets import target_dim


def swin_norm(cfg: ModelConfig) -> partial[nn.LayerNorm]:
    """The encoder's LayerNorm (patch embedding, blocks, patch merging, tap norms) at the config's eps."""
    return partial(nn.LayerNorm, eps=cfg.swin_norm_eps)


def swin_levels(cfg: ModelConfig) -> list[Level]:
    """Grid, window and shift of every Swin stage (timm's rule: a window never exceeds its grid)."""
    grid = cfg.img_size // cfg.patch_size
    levels = []
    for s in range(len(cfg.depths)):
        g = grid >> s
        window = min(cfg.window_size, g)
        levels.append(Level(g, window, cfg.window_size // 2 if g > cfg.window_size else 0))
    return levels


def _check_swin(cfg: ModelConfig) -> None:
    check_common(cfg)
    n = len(cfg.depths)
    require(n >= 1 and all(d >= 1 for d in cfg.depths),
            f"depths must list >= 1 block per Swin stage, got {cfg.depths}")
    require(len(cfg.stage_heads) == n, f"stage_heads must have one entry per Swin stage ({n}), got {cfg.stage_heads}")
    for s, heads in enumerate(cfg.stage_heads):
        dim = cfg.embed_dim << s
        require(heads >= 1 and dim % heads == 0,
                f"stage {s} width {dim} must be divisible by stage_heads[{s}] = {heads}")
    require(cfg.window_size >= 1, f"window_size must be >= 1, got {cfg.window_size}")
    grid = cfg.img_size // cfg.patch_size
    require(grid % (1 << (n - 1)) == 0,
            f"img_size {cfg.img_size} / patch_size {cfg.patch_size} = {grid} tokens must be divisible by "
            f"2^{n - 1} = {1 << (n - 1)} for {n - 1} patch mergings")
    for s, level in enumerate(swin_levels(cfg)):
        require(level.grid % level.window == 0,
                f"window_size {cfg.window_size} does not tile Swin stage {s}'s {level.grid}x{level.grid} grid; "
                f"use a window dividing {[lv.grid for lv in swin_levels(cfg) if lv.grid > cfg.window_size]} "
                f"or an img_size that is a multiple of patch_size * 2^{n - 1} * window_size")
    require(all(0 <= t < n for t in cfg.taps),
            f"taps must be Swin stage indices in [0, {n - 1}], got {cfg.taps}")
    require(cfg.taps[-1] == n - 1,
            f"the last tap must be the last Swin stage ({n - 1}), got {cfg.taps[-1]}; stages after it would never train")
    require(all(s == 1.0 for s in cfg.scales),
            f"Swin decoders predict at their tap's grid: scales must all be 1.0, got {cfg.scales}")
    require(cfg.mask_unit >= 1 and grid % cfg.mask_unit == 0,
            f"mask_unit {cfg.mask_unit} must divide the {grid}x{grid} token grid")
    if not cfg.dense_encoder:
        require(cfg.mask_unit % (1 << (n - 1)) == 0,
                f"mask_unit {cfg.mask_unit} must be a multiple of 2^{n - 1} = {1 << (n - 1)} tokens (one token of the "
                "last stage) so that patch merging sees whole visible 2x2 neighbourhoods")
    units = (grid // cfg.mask_unit) ** 2
    require(int(units * (1 - cfg.mask_ratio)) >= 1, f"mask_ratio {cfg.mask_ratio} leaves no visible unit out of {units}")


def _tap_level(s: int, num_levels: int) -> int:
    """Grid level a tap after Swin stage s reads: after the next patch merging, except at the top."""
    return min(s + 1, num_levels - 1)


def swin_taps(cfg: ModelConfig) -> list[Tap]:
    _check_swin(cfg)
    n = len(cfg.depths)
    taps = []
    for k, s in enumerate(cfg.taps):
        level = _tap_level(s, n)
        taps.append(make_tap(cfg, k, s, cfg.embed_dim << level, (cfg.img_size // cfg.patch_size) >> level,
                             cfg.patch_size << level))
    return taps


@dataclass
class SwinContext:
    """Per-batch token selection: None plans mean every token is present (full grid)."""

    mask: Tensor | None  # (B, grid0^2), True = masked
    dense: bool  # mask tokens inside the encoder (SimMIM-style)
    plans: list[LevelPlan] | None

    def plan(self, level: int) -> LevelPlan | None:
        return None if self.plans is None else self.plans[level]


def swin_context(cfg: ModelConfig, mask: Tensor | None, host_mask: Tensor | None = None) -> SwinContext:
    """Plans for the visible-token encoder, made from the host copy of the mask when the caller has one
    (else `mask` is read back from its device) and placed on `mask`'s device; the dense encoder reads
    the mask itself."""
    if mask is None or cfg.dense_encoder:
        return SwinContext(mask, cfg.dense_encoder, None)
    return SwinContext(mask, False, plan_levels(mask if host_mask is None else host_mask, swin_levels(cfg),
                                                mask.device))


class SwinLayer(nn.Module):
    """timm's Swin stage s blocks, followed by Swin stage s+1's patch merging (absent at the top)."""

    def __init__(self, cfg: ModelConfig, s: int, level: Level, drop_path: list[float], merge: bool):
        super().__init__()
        self.index, self.grid = s, level.grid
        dim = cfg.embed_dim << s
        self.blocks = nn.ModuleList([
            SwinTransformerBlock(dim, (level.grid, level.grid), cfg.stage_heads[s], window_size=level.window,
                                 shift_size=level.shift if i % 2 else 0, mlp_ratio=cfg.mlp_ratio, qkv_bias=True,
                                 drop_path=drop_path[i], norm_layer=swin_norm(cfg))
            for i in range(cfg.depths[s])
        ])
        self.downsample = PatchMerging(dim, 2 * dim, norm_layer=swin_norm(cfg)) if merge else None

    def forward(self, x: Tensor, ctx: SwinContext) -> Tensor:
        plan = ctx.plan(self.index)
        if plan is None:  # full grid: exactly timm's forward
            B, _, C = x.shape
            x = x.view(B, self.grid, self.grid, C)
            for block in self.blocks:
                x = block(x)
            if self.downsample is not None:
                x = self.downsample(x)
            return x.flatten(1, 2)
        for block in self.blocks:
            x = visible_block(block, x, plan.packs[block.shift_size[0]])
        if self.downsample is not None:
            x = visible_merge(self.downsample, x, plan.merge)
        return x


class SwinStage(nn.Module):
    """Swin stages up to a tap (with their patch mergings) and the local head reading the tap (`decoder`
    for `mim`, else `head`)."""

    def __init__(self, cfg: ModelConfig, k: int, first: int, tap: Tap, drop_path: list[list[float]], head: HeadType):
        super().__init__()
        levels, n = swin_levels(cfg), len(cfg.depths)
        self.first, self.dense = first, cfg.dense_encoder
        self.tap_level = _tap_level(tap.index, n)
        if first == 0:
            self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.embed_dim,
                                          norm_layer=swin_norm(cfg), output_fmt="NHWC")
            if cfg.dense_encoder:
                self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.layers = nn.ModuleList([SwinLayer(cfg, s, levels[s], drop_path[s], merge=s < n - 1)
                                     for s in range(first, tap.index + 1)])
        self.norm = swin_norm(cfg)(tap.dim)
        attach_head(self, head, cfg, tap.dim, lambda: LocalDecoder(
            tap.dim, per_tap(cfg.decoder_dim, k), cfg.decoder_depth, per_tap(cfg.decoder_heads, k),
            cfg.decoder_mlp_ratio, tap.grid, tap.scale, target_dim(cfg.target, tap.cell, cfg.in_chans, cfg.hog_nbins),
            has_cls=False,
        ), k)

    def embed(self, images: Tensor, ctx: SwinContext) -> Tensor:
        """Patch tokens in raster order: visible ones only, or all with mask tokens (dense encoder)."""
        x = self.patch_embed(images).flatten(1, 2)
        if ctx.mask is None:
            return x
        if ctx.dense:
            w = ctx.mask.unsqueeze(-1).to(x.dtype)
            return x * (1 - w) + self.mask_token.to(x.dtype) * w
        return take(x, ctx.plan(0).ids_keep)

    def forward(self, x: Tensor, ctx: SwinContext) -> Tensor:
        """Images (first stage) or the previous stage's tokens (B, N, C) -> this stage's tokens."""
        if self.first == 0:
            x = self.embed(x, ctx)
        return run_blocks(self, self.layers, x, ctx)

    def features(self, x: Tensor) -> Tensor:
        return self.norm(x)

    def predict(self, x: Tensor, ctx: SwinContext) -> Tensor:
        restore = None if ctx.dense else ctx.plan(self.tap_level).ids_restore
        return self.decoder(self.norm(x), restore)


def build_swin_stages(cfg: ModelConfig, taps: list[Tap], plan: StagePlan) -> list[SwinStage]:
    drop_path = calculate_drop_path_rates(cfg.drop_path_rate, cfg.depths, stagewise=True)
    starts = [0] + [t.index + 1 for t in taps[:-1]]
    return [SwinStage(cfg, k, s, t, drop_path, plan.heads[k]) for k, (s, t) in enumerate(zip(starts, taps))]


# ---- the published LocalMIM-Swin's patch merging ------------------------------------------------------

# The published code concatenates a 2 x 2 neighbourhood's tokens as (row, col) (0, 0), (0, 1), (1, 0), (1, 1);
# standard Swin (timm, isolocal) as (0, 0), (1, 0), (0, 1), (1, 1) (docs/method.md §5). Entry b is the
# published position of standard Swin's b-th neighbour.
_PUBLISHED_NEIGHBOURS = (0, 2, 1, 3)
# The axis of each patch-merging weight that runs over the four concatenated neighbours (4C).
_MERGE_AXES = {"norm.weight": 0, "norm.bias": 0, "reduction.weight": 1}


def merge_weight_from_published(name: str, value: Tensor) -> Tensor:
    """A published patch-merging weight (`norm.weight`, `norm.bias`, `reduction.weight`) in standard
    Swin's neighbour order: its 4C axis regrouped, so the merge computes the published function on the
    neighbourhood isolocal concatenates."""
    axis = _MERGE_AXES[name]
    blocks = value.unflatten(axis, (4, -1))
    return blocks.index_select(axis, torch.tensor(_PUBLISHED_NEIGHBOURS)).flatten(axis, axis + 1)


# ---- export to timm's SwinTransformer -------------------------------------------------------------

_TIMM_SIZES = {(96, (2, 2, 6, 2), (3, 6, 12, 24)): "tiny", (96, (2, 2, 18, 2), (3, 6, 12, 24)): "small",
               (128, (2, 2, 18, 2), (4, 8, 16, 32)): "base", (192, (2, 2, 18, 2), (6, 12, 24, 48)): "large"}


def _swin_timm_key(stage: nn.Module, head: str, rest: str) -> str | None:
    """`layers.i.blocks.*` -> timm's `layers.{first+i}.blocks.*`; `layers.i.downsample.*` -> timm's
    `layers.{first+i+1}.downsample.*` (the merging that follows a Swin stage opens the next one in timm)."""
    if head == "patch_embed":
        return f"{head}.{rest}"
    if head != "layers":
        return None
    i, _, tail = rest.partition(".")
    part, _, name = tail.partition(".")
    s = stage.first + int(i)
    return f"layers.{s}.blocks.{name}" if part == "blocks" else f"layers.{s + 1}.downsample.{name}"


def swin_state_dict(model: Any) -> dict[str, Tensor]:
    """Encoder weights under timm's SwinTransformer names."""
    return timm_state_dict(model.stages, _swin_timm_key)


def swin_timm_name_and_kwargs(model: Any) -> tuple[str, dict[str, Any]]:
    """A registered timm Swin name, plus constructor overrides when the config is not that model."""
    c = model.cfg
    size = _TIMM_SIZES.get((c.embed_dim, tuple(c.depths), tuple(c.stage_heads)))
    registered = None if size is None else f"swin_{size}_patch{c.patch_size}_window{c.window_size}_{c.img_size}"
    return timm_name_and_kwargs(c, registered, "swin_tiny_patch4_window7_224", dict(
        img_size=c.img_size, patch_size=c.patch_size, embed_dim=c.embed_dim, depths=tuple(c.depths),
        num_heads=tuple(c.stage_heads), window_size=c.window_size))


SWIN = Family(taps=swin_taps, build_stages=build_swin_stages, mask_grid=lambda cfg: cfg.img_size // cfg.patch_size,
              context=swin_context, has_cls=False,
              timm_name_and_kwargs=swin_timm_name_and_kwargs, timm_state_dict=swin_state_dict,
              timm_pool_kwargs=timm_pool_kwargs)
