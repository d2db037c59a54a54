"""Columnar ViT encoder split into stages at the taps, built from timm's `Block`.

Stage k owns blocks taps[k-1]+1 .. taps[k] (stage 0 also owns the patch embedding, CLS token and
fixed position embedding), plus its tap LayerNorm and local decoder. Parameter names follow timm's
`VisionTransformer` inside each stage, so exporting to timm is a renaming, not a conversion.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from isolocal.config import ModelConfig
from isolocal.heads.base import HeadType, attach_head
from isolocal.heads.plan import StagePlan
from isolocal.core.masking import visible_count, visible_indices
from isolocal.models.decoder import LayerNorm, LocalDecoder
from isolocal.models.family import Family, Tap, check_common, make_tap, per_tap, require
from isolocal.models.init_weights import mae_init
from isolocal.models.posembed import sincos_pos_embed
from isolocal.models.recompute import run_blocks
from isolocal.models.timm_export import timm_name_and_kwargs, timm_pool_kwargs, timm_state_dict
from isolocal.core.targets import target_dim


@dataclass
class ViTContext:
    """Which tokens the encoder sees: visible ids in raster order and the permutation back."""

    ids_keep: Tensor
    ids_restore: Tensor


class ViTStage(nn.Module):
    """A run of encoder blocks and the local head reading its output (`decoder` for `mim`, else `head`)."""

    def __init__(self, cfg: ModelConfig, k: int, first_block: int, tap: Tap, drop_path: list[float], head: HeadType):
        super().__init__()
        dim, grid = cfg.embed_dim, cfg.img_size // cfg.patch_size
        self.first_block = first_block
        if first_block == 0:
            self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, dim)
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
            self.pos_embed = nn.Parameter(sincos_pos_embed(dim, grid), requires_grad=False)
        self.blocks = nn.Sequential(*[
            Block(dim, cfg.num_heads, cfg.mlp_ratio, qkv_bias=True, norm_layer=LayerNorm, drop_path=drop_path[i])
            for i in range(first_block, tap.index + 1)
        ])
        self.norm = LayerNorm(dim)
        attach_head(self, head, cfg, dim, lambda: LocalDecoder(
            dim, per_tap(cfg.decoder_dim, k), cfg.decoder_depth, per_tap(cfg.decoder_heads, k),
            cfg.decoder_mlp_ratio, grid, tap.scale, target_dim(cfg.target, tap.cell, cfg.in_chans, cfg.hog_nbins),
        ), k)

    def embed(self, images: Tensor, ctx: ViTContext | None) -> Tensor:
        """Patch tokens + positions, visible ones only, CLS prepended."""
        x = self.patch_embed(images) + self.pos_embed[:, 1:]
        if ctx is not None:
            x = torch.gather(x, 1, ctx.ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1)

    def forward(self, x: Tensor, ctx: ViTContext | None) -> Tensor:
        """Images (first stage) or the previous stage's tokens -> this stage's tokens."""
        if self.first_block == 0:
            x = self.embed(x, ctx)
        return run_blocks(self, self.blocks, x)

    def features(self, x: Tensor) -> Tensor:
        """The tap's normalized tokens (what the decoder and the probes read)."""
        return self.norm(x)

    def predict(self, x: Tensor, ctx: ViTContext) -> Tensor:
        return self.decoder(self.norm(x), ctx.ids_restore)


def vit_taps(cfg: ModelConfig) -> list[Tap]:
    check_common(cfg)
    require(cfg.embed_dim % cfg.num_heads == 0,
            f"embed_dim {cfg.embed_dim} must be divisible by num_heads {cfg.num_heads}")
    require(all(0 <= t < cfg.depth for t in cfg.taps), f"taps must be block indices in [0, {cfg.depth - 1}], got {cfg.taps}")
    require(cfg.taps[-1] == cfg.depth - 1,
            f"the last tap must be the last block ({cfg.depth - 1}), got {cfg.taps[-1]}; blocks after it would never train")
    grid = cfg.img_size // cfg.patch_size
    return [make_tap(cfg, k, t, cfg.embed_dim, grid, cfg.patch_size) for k, t in enumerate(cfg.taps)]


def build_vit_stages(cfg: ModelConfig, taps: list[Tap], plan: StagePlan) -> list[ViTStage]:
    drop_path = torch.linspace(0, cfg.drop_path_rate, cfg.depth).tolist()
    starts = [0] + [t.index + 1 for t in taps[:-1]]
    return [ViTStage(cfg, k, s, t, drop_path, plan.heads[k]) for k, (s, t) in enumerate(zip(starts, taps))]


def vit_copy_layers(cfg: ModelConfig, after: int, layers: Sequence[int], width: float) -> tuple[nn.Sequential, int]:
    """Fresh transformer blocks, one per backbone block in `layers` (every block has the same shape), of
    round(num_heads x `width`) heads of the backbone's head width, then a LayerNorm as a stage's features
    end in; a linear map from the embedding width first when the width differs. MAE's init, no drop path.
    Returns them and their width. (`after`: every block reads the same width.)"""
    head_dim = cfg.embed_dim // cfg.num_heads
    heads = max(1, round(cfg.num_heads * width))
    dim = heads * head_dim
    parts: list[nn.Module] = [nn.Linear(cfg.embed_dim, dim)] if dim != cfg.embed_dim else []
    parts += [Block(dim, heads, cfg.mlp_ratio, qkv_bias=True, norm_layer=LayerNorm) for _ in layers]
    copies = nn.Sequential(*parts, LayerNorm(dim))
    copies.apply(mae_init)
    return copies, dim


def vit_mask_grid(cfg: ModelConfig) -> int:
    return cfg.img_size // cfg.patch_size


def vit_context(cfg: ModelConfig, mask: Tensor | None, host_mask: Tensor | None = None) -> ViTContext | None:
    """Token selection computed on the mask's device (the host copy is not needed): a stable sort of the
    mask, cut at the config's keep count, so shapes are fixed and no mask value is read on the host."""
    if mask is None:
        return None
    return ViTContext(*visible_indices(mask, visible_count(vit_mask_grid(cfg), cfg.mask_ratio, cfg.mask_unit)))


# ---- export to timm's VisionTransformer ----------------------------------------------------------

_TIMM_SIZES = {(192, 12, 3): "vit_tiny", (384, 12, 6): "vit_small", (768, 12, 12): "vit_base", (1024, 24, 16): "vit_large"}


def _vit_timm_key(stage: nn.Module, head: str, rest: str) -> str | None:
    """Stage-local block indices become global ones; stage 0's embedding moves to the top level."""
    if head == "blocks":
        index, _, tail = rest.partition(".")
        return f"blocks.{stage.first_block + int(index)}.{tail}"
    if head in ("patch_embed", "cls_token", "pos_embed"):
        return f"{head}.{rest}" if rest else head
    return None


def vit_state_dict(model: Any) -> dict[str, Tensor]:
    """Encoder weights under timm's VisionTransformer names."""
    return timm_state_dict(model.stages, _vit_timm_key)


def vit_timm_name_and_kwargs(model: Any) -> tuple[str, dict[str, Any]]:
    """A registered timm ViT name, plus constructor overrides when the config is not that model."""
    c = model.cfg
    size = _TIMM_SIZES.get((c.embed_dim, c.depth, c.num_heads))
    registered = None if size is None else f"{size}_patch{c.patch_size}_{c.img_size}"
    return timm_name_and_kwargs(c, registered, "vit_base_patch16_224", dict(
        img_size=c.img_size, patch_size=c.patch_size, embed_dim=c.embed_dim, depth=c.depth, num_heads=c.num_heads))


def vit_timm_pool_kwargs(feature: str) -> dict[str, Any]:
    """The feature's pooling without `fc_norm`: isolocal's features are the normalized tokens, pooled
    (timm's ViT would otherwise norm after average pooling instead of before it, and drop `norm`)."""
    return {**timm_pool_kwargs(feature), "fc_norm": False}


VIT = Family(taps=vit_taps, build_stages=build_vit_stages, mask_grid=vit_mask_grid, context=vit_context,
             has_cls=True, timm_name_and_kwargs=vit_timm_name_and_kwargs, timm_state_dict=vit_state_dict,
             timm_pool_kwargs=vit_timm_pool_kwargs, copy_layers=vit_copy_layers,
             live_layers=lambda stage: nn.Sequential(stage.blocks, stage.norm))
