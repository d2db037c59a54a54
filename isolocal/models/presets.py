"""Named presets: published recipes and small CPU configs, all as ModelConfigs of one model."""
from __future__ import annotations

import dataclasses
from typing import Callable

from isolocal.config import ModelConfig

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


_BUILDERS: dict[str, Callable[[], ModelConfig]] = {}
for _size in VIT_SIZES:
    for _name, _fn in (("localmim", localmim_vit), ("mae", mae_vit), ("maskfeat", maskfeat_vit)):
        _BUILDERS[f"{_name}_vit_{_size}"] = (lambda fn=_fn, s=_size: fn(s))


def register_preset(name: str, builder: Callable[[], ModelConfig]) -> None:
    """Add a preset (used by the Swin family and by users' own studies)."""
    _BUILDERS[name] = builder


def list_models() -> list[str]:
    """Preset names, sorted."""
    _load_families()
    return sorted(_BUILDERS)


def preset_config(name: str) -> ModelConfig:
    """A fresh copy of a preset's ModelConfig."""
    _load_families()
    if name not in _BUILDERS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(sorted(_BUILDERS))}")
    return dataclasses.replace(_BUILDERS[name]())


def _load_families() -> None:
    """Families register their presets on import (Swin lives in its own module)."""
    import importlib.util

    if importlib.util.find_spec("isolocal.models.swin") is not None:
        importlib.import_module("isolocal.models.swin")
