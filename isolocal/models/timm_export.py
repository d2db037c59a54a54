"""What every family's export to timm shares: stage keys renamed to timm's names, constructor overrides.

Stages keep timm's parameter names, so an export is a renaming. Each family (`vit.py`, `swin.py`,
`resnet.py`) says how its stage keys map to timm's; the last tap's LayerNorm (ViT, Swin) is timm's
final `norm`, while the other tap norms and every local head (decoders included) are pre-training
heads and are not exported. The pooling is recorded too (`timm_pool_kwargs`): timm's output is then
the feature the probes read from the last stage (`eval.feature`).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import timm
from torch import Tensor, nn

from isolocal.config import ModelConfig

# (stage module, first part of its key, the rest) -> timm's name, or None to leave the key out
Rename = Callable[[nn.Module, str, str], "str | None"]


def timm_state_dict(stages: nn.ModuleList, rename: Rename) -> dict[str, Tensor]:
    """The encoder's weights under timm's names, from every stage's state dict."""
    sd: dict[str, Tensor] = {}
    last = len(stages) - 1
    for k, stage in enumerate(stages):
        for key, value in stage.state_dict().items():
            head, _, rest = key.partition(".")
            name = (key if k == last else None) if head == "norm" else rename(stage, head, rest)
            if name is not None:
                sd[name] = value
    return sd


def timm_name_and_kwargs(cfg: ModelConfig, registered: str | None, fallback: str,
                         geometry: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(timm model name, `create_model` overrides): `registered` when timm has that model (None: no
    timm size fits), else `fallback` built with the config's `geometry`; plus in_chans and mlp_ratio
    where they are not timm's defaults."""
    if registered is not None and registered in timm.list_models():
        name, kwargs = registered, {}
    else:
        name, kwargs = fallback, dict(geometry)
    if cfg.in_chans != 3:
        kwargs["in_chans"] = cfg.in_chans
    if cfg.mlp_ratio != 4.0:
        kwargs["mlp_ratio"] = cfg.mlp_ratio
    return name, kwargs


TIMM_POOL = {"cls": "token", "mean": "avg"}  # eval.feature -> timm's global_pool


def timm_pool_kwargs(feature: str) -> dict[str, Any]:
    """timm's pooling for a probe feature (already checked against the model): Swin and ResNet need
    `global_pool` alone, their timm norm (if any) comes before pooling as isolocal's does."""
    return {"global_pool": TIMM_POOL[feature]}
