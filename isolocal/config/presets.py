"""Named presets of the families (ViT, Swin, ResNet): published recipes and small CPU configs, all as
ModelConfigs (`PRESETS`). The table is plain data: importing this module builds no model and
imports no family module."""
from __future__ import annotations

import copy
from typing import Any

from isolocal.config.parse import from_dict, to_dict
from isolocal.config.schema import ModelConfig

# (embed_dim, depth, num_heads) of the columnar sizes; nano and micro are for tests and CPU studies.
VIT_SIZES = {
    "nano": (64, 4, 2),
    "micro": (128, 8, 4),
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
}
_SMALL_IMAGE = {"img_size": 32, "patch_size": 4, "in_chans": 1}  # Fashion-MNIST resized to 32 px


def _vit(size: str, **kw) -> ModelConfig:
    dim, depth, heads = VIT_SIZES[size]
    if size in ("nano", "micro"):
        kw = {**_SMALL_IMAGE, "decoder_dim": [dim], "decoder_heads": [max(heads, 2)], **kw}
    return ModelConfig(arch="vit", embed_dim=dim, depth=depth, num_heads=heads, **kw)


def localmim_vit(size: str) -> ModelConfig:
    """Published LocalMIM-HOG: taps after blocks 2, 4, depth-2, depth; scales x4, x2, x1, x0.5."""
    depth = VIT_SIZES[size][1]
    taps = [0, 1, 2, 3] if depth == 4 else [1, 3, depth - 3, depth - 1]
    large = size == "large"
    return _vit(size, taps=taps, scales=[4.0, 2.0, 1.0, 0.5], target="hog",
                hog_nbins=18 if large else 9, hog_bias=large)


def mae_vit(size: str) -> ModelConfig:
    """MAE: top-only normalized pixels with an 8-block 512-d decoder (smaller for nano/micro)."""
    depth = VIT_SIZES[size][1]
    small = size in ("nano", "micro")
    return _vit(size, taps=[depth - 1], scales=[1.0], target="pixels",
                decoder_dim=[VIT_SIZES[size][0] if small else 512], decoder_heads=[2 if small else 16],
                decoder_depth=2 if small else 8)


def maskfeat_vit(size: str) -> ModelConfig:
    """MaskFeat-style: top-only HOG at the patch scale, LocalMIM's one-block decoder."""
    depth = VIT_SIZES[size][1]
    return _vit(size, taps=[depth - 1], scales=[1.0], target="hog")


SWIN_SIZES = {  # embed_dim, depths, heads; nano is a 4-stage CPU/test model on 32 px gray images
    "nano": (32, [2, 2, 2, 2], [1, 2, 4, 8]),
    "tiny": (96, [2, 2, 6, 2], [3, 6, 12, 24]),
    "small": (96, [2, 2, 18, 2], [3, 6, 12, 24]),
    "base": (128, [2, 2, 18, 2], [4, 8, 16, 32]),
    "large": (192, [2, 2, 18, 2], [6, 12, 24, 48]),
}
# 32 px gray (Fashion-MNIST) at patch 1: grids 32/16/8/4, windows 4, 8 px mask units (4x4 units).
_SWIN_NANO = {"img_size": 32, "patch_size": 1, "in_chans": 1, "window_size": 4, "decoder_dim": [32, 64, 64, 64]}


def _swin(size: str, **kw: Any) -> ModelConfig:
    """Published Swin LocalMIM geometry: 224 px, patch 4, window 7, 32 px mask units, one mask per batch."""
    dim, depths, heads = SWIN_SIZES[size]
    base = dict(arch="swin", img_size=224, patch_size=4, embed_dim=dim, depths=list(depths), stage_heads=list(heads),
                window_size=7, taps=list(range(len(depths))), scales=[1.0] * len(depths),
                decoder_dim=[64, 128, 128, 128], decoder_heads=[4], decoder_depth=1,
                mask_ratio=0.75, mask_unit=8, mask_per_batch=True)  # 0.75 of 49 units keeps 12, masks 37
    return ModelConfig(**{**base, **(_SWIN_NANO if size == "nano" else {}), **kw})


def localmim_swin(size: str, target: str = "hog") -> ModelConfig:
    """LocalMIM-Swin: taps at every stage, HOG with 18 bins and the frozen gradient bias, or pixels. The
    published sizes build the encoder's LayerNorms with eps 1e-6, as the published code does; nano,
    isolocal's CPU model and no published recipe, keeps timm's 1e-5."""
    eps = {} if size == "nano" else {"swin_norm_eps": 1e-6}
    return _swin(size, target=target, hog_nbins=18, hog_bias=target == "hog", **eps)


def simmim_swin(size: str) -> ModelConfig:
    """SimMIM-style baseline: mask tokens inside a dense encoder, top-only pixels, per-image 0.6 masks."""
    last = len(SWIN_SIZES[size][1]) - 1
    return _swin(size, dense_encoder=True, taps=[last], scales=[1.0], target="pixels",
                 decoder_dim=[64 if size == "nano" else 128], mask_ratio=0.6, mask_per_batch=False)


# CIFAR ResNets (He et al. 2016, as in InfoPro): 3 stages of n BasicBlocks at 16/32/64 channels, the 3x3 stem;
# at 32 px gray (Fashion-MNIST padded 28 -> 32), `<name>_k<K>` for K local stages (InfoPro's K; the stem shares
# stage 0, so K <= the block count). ImageNet ResNets at timm's geometry, one stage per timm stage.
RESNET_CIFAR = {"resnet32": 5, "resnet110": 18}
RESNET_CIFAR_STAGES = (2, 4, 8, 16)
RESNET_IMAGENET = {"resnet18": ("basic", [2, 2, 2, 2]), "resnet50": ("bottleneck", [3, 4, 6, 3])}


def even_taps(blocks: int, stages: int) -> list[int]:
    """The last block of each of `stages` runs splitting `blocks` as evenly as possible (longer runs first)."""
    if not 1 <= stages <= blocks:
        raise ValueError(f"cannot split {blocks} residual blocks into {stages} stages; use 1 to {blocks}")
    size, extra = divmod(blocks, stages)
    ends, end = [], 0
    for k in range(stages):
        end += size + (k < extra)
        ends.append(end - 1)
    return ends


def cifar_resnet(n: int, stages: int) -> ModelConfig:
    """ResNet-(6n+2) for 32 px gray images, split into `stages` local stages, a classify head each."""
    return ModelConfig(arch="resnet", img_size=32, in_chans=1, block="basic", depths=[n] * 3, channels=[16, 32, 64],
                       stem="cifar", taps=even_taps(3 * n, stages), objective="classify")


def imagenet_resnet(name: str) -> ModelConfig:
    """timm's ResNet-18/50 at 224 px, one local stage per timm stage."""
    block, depths = RESNET_IMAGENET[name]
    return ModelConfig(arch="resnet", img_size=224, block=block, depths=list(depths), channels=[64, 128, 256, 512],
                       stem="imagenet", taps=[sum(depths[:s + 1]) - 1 for s in range(len(depths))],
                       objective="classify")


def _presets() -> dict[str, ModelConfig]:
    """Every preset by name, families in turn."""
    table = {}
    for size in VIT_SIZES:
        table |= {f"localmim_vit_{size}": localmim_vit(size), f"mae_vit_{size}": mae_vit(size),
                  f"maskfeat_vit_{size}": maskfeat_vit(size)}
    for size in SWIN_SIZES:
        table |= {f"localmim_swin_{size}": localmim_swin(size),
                  f"localmim_swin_{size}_pix": localmim_swin(size, "pixels"), f"simmim_swin_{size}": simmim_swin(size)}
    for name, n in RESNET_CIFAR.items():
        for k in (k for k in RESNET_CIFAR_STAGES if k <= 3 * n):  # ResNet-32 has 15 blocks: no k16
            table[f"{name}_k{k}"] = cifar_resnet(n, k)
    for name in RESNET_IMAGENET:
        table[name] = imagenet_resnet(name)
    return table


# name -> ModelConfig of every preset; read it through `preset_config`, which hands out a copy.
PRESETS: dict[str, ModelConfig] = _presets()


def list_models() -> list[str]:
    """Preset names, sorted."""
    return sorted(PRESETS)


def preset_config(name: str) -> ModelConfig:
    """A fresh copy of a preset's ModelConfig (its lists are the copy's own)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}")
    return copy.deepcopy(PRESETS[name])


def resolve_model_config(preset: str, overrides: dict) -> ModelConfig:
    """The preset's ModelConfig with `overrides` (a dict of ModelConfig fields) applied."""
    base = to_dict(preset_config(preset))
    base.update(overrides)
    return from_dict(ModelConfig, base, prefix="model.")
