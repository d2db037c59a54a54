"""Columnar ViT encoder split into stages at the taps, built from timm's `Block`.

Stage k owns blocks taps[k-1]+1 .. taps[k] (stage 0 also owns the patch embedding, CLS token and
fixed position embedding), plus its tap LayerNorm and local decoder. Parameter names follow timm's
`VisionTransformer` inside each stage, so exporting to timm is a renaming, not a conversion.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from isolocal.config import ModelConfig
from isolocal.masking import visible_indices
from isolocal.models.decoder import LayerNorm, LocalDecoder
from isolocal.models.geometry import Family, Tap, check_common, make_tap, per_tap, require
from isolocal.models.posembed import sincos_pos_embed
from isolocal.targets import target_dim


@dataclass
class ViTContext:
    """Which tokens the encoder sees: visible ids in raster order and the permutation back."""

    ids_keep: Tensor
    ids_restore: Tensor

    @classmethod
    def from_mask(cls, mask: Tensor | None) -> "ViTContext | None":
        return None if mask is None else cls(*visible_indices(mask))


class ViTStage(nn.Module):
    """A run of encoder blocks and the local head reading its output."""

    def __init__(self, cfg: ModelConfig, k: int, first_block: int, tap: Tap, drop_path: list[float]):
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
        self.decoder = LocalDecoder(
            dim, per_tap(cfg.decoder_dim, k), cfg.decoder_depth, per_tap(cfg.decoder_heads, k),
            cfg.decoder_mlp_ratio, grid, tap.scale, target_dim(cfg.target, tap.cell, cfg.in_chans, cfg.hog_nbins),
        )

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
        return self.blocks(x)

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


def build_vit_stages(cfg: ModelConfig, taps: list[Tap]) -> list[ViTStage]:
    drop_path = torch.linspace(0, cfg.drop_path_rate, cfg.depth).tolist()
    starts = [0] + [t.index + 1 for t in taps[:-1]]
    return [ViTStage(cfg, k, s, t, drop_path) for k, (s, t) in enumerate(zip(starts, taps))]


def vit_mask_grid(cfg: ModelConfig) -> int:
    return cfg.img_size // cfg.patch_size


VIT = Family(taps=vit_taps, build_stages=build_vit_stages, mask_grid=vit_mask_grid,
             context=lambda cfg, mask: ViTContext.from_mask(mask), has_cls=True)
