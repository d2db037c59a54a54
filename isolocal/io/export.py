"""Encoder export to timm: `timm.create_model(name, **kwargs).load_state_dict(sd)`.

Each family writes its own renaming (`models/vit.py`, `models/swin.py`, sharing
`models/timm_export.py`); this module is the public face: the export, a timm model loaded with it,
and the files `isolocal export` writes. With a probe feature (`eval.feature`), the kwargs also set
timm's pooling, so `model.forward_head(model.forward_features(x), pre_logits=True)` (or, with
`num_classes=0`, `model(x)`) is exactly the feature the probes read from the last stage.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import timm
from torch import Tensor, nn

from isolocal.io.checkpoint import atomic_save
from isolocal.io.load import load_run
from isolocal.io.paths import check_writable_file
from isolocal.models.encoder import StagewiseEncoder
from isolocal.models.family import check_feature


def export_timm(model: StagewiseEncoder) -> tuple[str, dict[str, Tensor]]:
    """(timm model name, encoder state dict). Non-standard sizes also need `timm_kwargs(model)`."""
    return model.family.timm_name_and_kwargs(model)[0], model.family.timm_state_dict(model)


def timm_kwargs(model: StagewiseEncoder, feature: str | None = None) -> dict[str, Any]:
    """Overrides for `timm.create_model` when the config is not a registered timm size ({} if it is);
    with `feature` ("cls" | "mean", as `eval.feature`) also timm's pooling that gives that feature."""
    kwargs = model.family.timm_name_and_kwargs(model)[1]
    if feature is None:
        return kwargs
    check_feature(feature, model.family.has_cls)
    return {**kwargs, **model.family.timm_pool_kwargs(feature)}


def create_timm_model(model: StagewiseEncoder, feature: str | None = None, **kwargs: Any) -> nn.Module:
    """A timm encoder (no classifier unless `num_classes` is given; pooling as `feature`, see
    `timm_kwargs`) loaded strictly with the export."""
    name, sd = export_timm(model)
    kwargs = {"num_classes": 0, **timm_kwargs(model, feature), **kwargs}
    timm_model = timm.create_model(name, pretrained=False, **kwargs)
    missing, unexpected = timm_model.load_state_dict(sd, strict=False)
    head = {id(p) for p in timm_model.get_classifier().parameters()}
    fresh = {n for n, p in timm_model.named_parameters() if id(p) in head}  # the classifier (num_classes > 0)
    missing = [k for k in missing if k not in fresh]
    if missing or unexpected:
        raise ValueError(f"export does not match timm's {name}: missing {missing}, unexpected {unexpected}")
    return timm_model


def write_timm_export(ckpt: str | os.PathLike, out: str | os.PathLike) -> tuple[Path, Path, str, dict[str, Any]]:
    """Export the encoder of any isolocal checkpoint or run directory: the state dict to `out`; the timm
    model name, the kwargs (`num_classes=0`, the geometry, the pooling of the run's `eval.feature`) and
    that feature to `out` with suffix .json. Returns (out, sidecar, name, kwargs); raises before any work
    when `out` cannot be written, and before writing unless the export loads strictly into timm."""
    check_writable_file(out, "export (--out)")
    cfg, model = load_run(ckpt)
    feature = cfg.eval.feature if model.family.has_cls else "mean"  # without a CLS token, probes read the mean
    create_timm_model(model, feature)
    name, state_dict = export_timm(model)
    kwargs = {"num_classes": 0, **timm_kwargs(model, feature)}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(state_dict, out)
    sidecar = out.with_suffix(".json")
    sidecar.write_text(json.dumps({"timm_model": name, "kwargs": kwargs, "feature": feature,
                                   "checkpoint": str(ckpt)}, indent=2) + "\n")
    return out, sidecar, name, kwargs


def timm_load_line(out: str | os.PathLike, name: str, kwargs: dict[str, Any]) -> str:
    """The Python line that loads an export written to `out` with its sidecar's `kwargs` (a model
    registered outside timm needs its module imported first)."""
    module = timm.models.model_entrypoint(name).__module__
    imports = "" if module.startswith("timm.") else f"import {module}; "
    return f"{imports}timm.create_model({name!r}, **{kwargs}).load_state_dict(torch.load({str(out)!r}))"
