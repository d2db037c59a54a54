"""The local decoder: visible tokens + mask tokens -> one transformer block -> rescale head.

One decoder per tap, each with its own weights (docs/method.md §2). The rescale head turns the
decoder's token grid into the target grid of its scale: transposed convolutions up, average pool
down, a 1x1 convolution to the target dimension. Its position table is timm's sin-cos layout, a
channel permutation of the published code's (MAE's); `load_published_decoder` maps a published
decoder onto it (docs/method.md §9).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from functools import partial

import torch
from timm.layers import LayerNorm2d
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from isolocal.models.posembed import mae_channel_order, sincos_pos_embed

LayerNorm = partial(nn.LayerNorm, eps=1e-6)


def rescale_head(dim: int, scale: float, out_dim: int) -> nn.Sequential:
    """x2^n: n ConvTranspose(k2, s2) halving channels (channel LayerNorm + GELU between); x2^-n: AvgPool."""
    layers: list[nn.Module] = []
    if scale >= 1:
        for i in range(int(math.log2(scale))):
            if i > 0:
                layers += [LayerNorm2d(dim), nn.GELU()]
            layers.append(nn.ConvTranspose2d(dim, dim // 2, kernel_size=2, stride=2))
            dim //= 2
    else:
        k = int(round(1 / scale))
        layers.append(nn.AvgPool2d(k, k))
    layers.append(nn.Conv2d(dim, out_dim, kernel_size=1))
    return nn.Sequential(*layers)


class LocalDecoder(nn.Module):
    """Linear -> mask tokens -> un-shuffle -> fixed sin-cos positions -> blocks -> norm -> rescale."""

    def __init__(self, in_dim: int, dim: int, depth: int, num_heads: int, mlp_ratio: float,
                 grid: int, scale: float, out_dim: int, has_cls: bool = True):
        super().__init__()
        self.grid, self.has_cls = grid, has_cls
        self.embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        pos = sincos_pos_embed(dim, grid, cls_token=has_cls)
        self.pos_embed = nn.Parameter(pos, requires_grad=False)
        self.blocks = nn.Sequential(*[
            Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=LayerNorm) for _ in range(depth)
        ])
        self.norm = LayerNorm(dim)
        self.head = rescale_head(dim, scale, out_dim)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, x: Tensor, ids_restore: Tensor | None) -> Tensor:
        """x: (B, [1 +] visible, in_dim) -> predictions (B, cells at this scale, out_dim)."""
        x = self.embed(x)
        prefix, tokens = (x[:, :1], x[:, 1:]) if self.has_cls else (x[:, :0], x)
        if ids_restore is not None:
            B, L = ids_restore.shape
            masked = self.mask_token.expand(B, L - tokens.shape[1], -1).to(tokens.dtype)
            tokens = torch.cat([tokens, masked], dim=1)
            tokens = torch.gather(tokens, 1, ids_restore.unsqueeze(-1).expand(-1, -1, tokens.shape[2]))
        x = torch.cat([prefix, tokens], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        x = x[:, prefix.shape[1]:]
        B, L, D = x.shape
        x = self.head(x.transpose(1, 2).reshape(B, D, self.grid, self.grid))
        return x.flatten(2).transpose(1, 2)

    def width_axes(self) -> dict[str, int]:
        """The axis of every weight that meets the decoder width (the residual stream between `embed`
        and the head): permuting all of them by one permutation leaves the decoder's function unchanged."""
        axes = {"mask_token": 2, "pos_embed": 2, "embed.weight": 0, "embed.bias": 0, "norm.weight": 0, "norm.bias": 0}
        for i in range(len(self.blocks)):
            for name, axis in (("norm1.weight", 0), ("norm1.bias", 0), ("attn.qkv.weight", 1), ("attn.proj.weight", 0),
                               ("attn.proj.bias", 0), ("norm2.weight", 0), ("norm2.bias", 0), ("mlp.fc1.weight", 1),
                               ("mlp.fc2.weight", 0), ("mlp.fc2.bias", 0)):
                axes[f"blocks.{i}.{name}"] = axis
        index, first = next((i, m) for i, m in enumerate(self.head) if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)))
        axes[f"head.{index}.weight"] = 0 if isinstance(first, nn.ConvTranspose2d) else 1  # (in, out, ..), (out, in, ..)
        return axes


def published_decoder_entry(key: str, value: Tensor) -> tuple[str, Tensor]:
    """A published decoder entry under its `LocalDecoder` name: the rescale head `pred` is `head`. The
    published Swin's head is one Linear (`pred.weight`, `pred.bias`: every Swin scale is 1), which is the
    scale-1 head's 1 x 1 convolution `head.0`, its weight given the two kernel axes."""
    if key in ("pred.weight", "pred.bias"):
        return "head.0." + key.removeprefix("pred."), value[..., None, None] if key == "pred.weight" else value
    return ("head." + key.removeprefix("pred.") if key.startswith("pred.") else key), value


def load_published_decoder(decoder: LocalDecoder, state: Mapping[str, Tensor]) -> None:
    """Load one decoder of a published LocalMIM checkpoint (its `decoder.<k>.` entries without that
    prefix: embed, mask_token, pos_embed, blocks, norm, pred) into `decoder`, strictly. The published
    decoder adds MAE's sin-cos table, a channel permutation of isolocal's, so every weight is permuted
    along the decoder width to isolocal's layout: the loaded decoder computes the published function
    and its table is isolocal's own."""
    order = mae_channel_order(decoder.embed.out_features)
    axes = decoder.width_axes()
    renamed = dict(published_decoder_entry(k, v) for k, v in state.items())
    for key, value in renamed.items():
        if key in axes and value.shape[axes[key]] != len(order):
            raise ValueError(f"published decoder entry {key} has shape {tuple(value.shape)}: its axis {axes[key]} "
                             f"should be the decoder width {len(order)}")
    decoder.load_state_dict({k: v.index_select(axes[k], order) if k in axes else v for k, v in renamed.items()})
