"""Encoder export to timm: `timm.create_model(name, num_classes=0, **kwargs).load_state_dict(sd)`.

Stages keep timm's parameter names, so export is a renaming: stage-local block indices become
global ones, stage 0's embedding moves to the top level, the last tap's LayerNorm becomes timm's
final `norm`. Intermediate tap norms and decoders are pre-training heads and are not exported.
"""
from __future__ import annotations

from typing import Any

import timm
from torch import Tensor, nn

from isolocal.models.mim import LocalMIM
from isolocal.models.swin import swin_state_dict, swin_timm_name_and_kwargs

_VIT_NAMES = {(192, 12, 3): "vit_tiny", (384, 12, 6): "vit_small", (768, 12, 12): "vit_base", (1024, 24, 16): "vit_large"}


def _vit_state_dict(model: LocalMIM) -> dict[str, Tensor]:
    sd: dict[str, Tensor] = {}
    for k, stage in enumerate(model.stages):
        for key, value in stage.state_dict().items():
            head, _, rest = key.partition(".")
            if head == "blocks":
                index, _, tail = rest.partition(".")
                sd[f"blocks.{stage.first_block + int(index)}.{tail}"] = value
            elif head in ("patch_embed", "cls_token", "pos_embed"):
                sd[key] = value
            elif head == "norm" and k == model.num_stages - 1:
                sd[key] = value
    return sd


def _vit_name_and_kwargs(model: LocalMIM) -> tuple[str, dict[str, Any]]:
    c = model.cfg
    family = _VIT_NAMES.get((c.embed_dim, c.depth, c.num_heads), "vit_base")
    name = f"{family}_patch{c.patch_size}_{c.img_size}"
    kwargs: dict[str, Any] = {}
    if name not in timm.list_models() or family == "vit_base" and (c.embed_dim, c.depth, c.num_heads) != (768, 12, 12):
        name = "vit_base_patch16_224"
        kwargs = dict(img_size=c.img_size, patch_size=c.patch_size, embed_dim=c.embed_dim,
                      depth=c.depth, num_heads=c.num_heads)
    if c.in_chans != 3:
        kwargs["in_chans"] = c.in_chans
    if c.mlp_ratio != 4.0:
        kwargs["mlp_ratio"] = c.mlp_ratio
    return name, kwargs


def _exporters() -> dict[str, Any]:
    return {"vit": (_vit_name_and_kwargs, _vit_state_dict),
            "swin": (swin_timm_name_and_kwargs, swin_state_dict)}


def _exporter(model: LocalMIM) -> Any:
    exporters = _exporters()
    if model.cfg.arch not in exporters:
        raise ValueError(f"no timm export for arch {model.cfg.arch!r}; supported: {sorted(exporters)}")
    return exporters[model.cfg.arch]


def export_timm(model: LocalMIM) -> tuple[str, dict[str, Tensor]]:
    """(timm model name, encoder state dict). Non-standard sizes also need `timm_kwargs(model)`."""
    name_fn, sd_fn = _exporter(model)
    return name_fn(model)[0], sd_fn(model)


def timm_kwargs(model: LocalMIM) -> dict[str, Any]:
    """Overrides for `timm.create_model` when the config is not a registered timm size ({} if it is)."""
    return _exporter(model)[0](model)[1]


def create_timm_model(model: LocalMIM, **kwargs: Any) -> nn.Module:
    """A timm encoder (no classifier unless `num_classes` is given) loaded strictly with the export."""
    name, sd = export_timm(model)
    timm_model = timm.create_model(name, pretrained=False, **{"num_classes": 0, **timm_kwargs(model), **kwargs})
    missing, unexpected = timm_model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith("head")]
    if missing or unexpected:
        raise ValueError(f"export does not match timm's {name}: missing {missing}, unexpected {unexpected}")
    return timm_model
