"""Encoder export to timm: `timm.create_model(name, num_classes=0, **kwargs).load_state_dict(sd)`.

Each family writes its own renaming (`models/vit.py`, `models/swin.py`, sharing
`models/timm_export.py`); this module is the public face: the export, a timm model loaded with it,
and the files `isolocal export` writes.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import timm
from torch import Tensor, nn

from isolocal.io.checkpoint import atomic_save
from isolocal.io.load import load_model
from isolocal.io.paths import check_writable_file
from isolocal.models.encoder import StagewiseEncoder


def export_timm(model: StagewiseEncoder) -> tuple[str, dict[str, Tensor]]:
    """(timm model name, encoder state dict). Non-standard sizes also need `timm_kwargs(model)`."""
    return model.family.timm_name_and_kwargs(model)[0], model.family.timm_state_dict(model)


def timm_kwargs(model: StagewiseEncoder) -> dict[str, Any]:
    """Overrides for `timm.create_model` when the config is not a registered timm size ({} if it is)."""
    return model.family.timm_name_and_kwargs(model)[1]


def create_timm_model(model: StagewiseEncoder, **kwargs: Any) -> nn.Module:
    """A timm encoder (no classifier unless `num_classes` is given) loaded strictly with the export."""
    name, sd = export_timm(model)
    timm_model = timm.create_model(name, pretrained=False, **{"num_classes": 0, **timm_kwargs(model), **kwargs})
    missing, unexpected = timm_model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith("head")]
    if missing or unexpected:
        raise ValueError(f"export does not match timm's {name}: missing {missing}, unexpected {unexpected}")
    return timm_model


def write_timm_export(ckpt: str | os.PathLike, out: str | os.PathLike) -> tuple[Path, Path, str, dict[str, Any]]:
    """Export the encoder of any isolocal checkpoint or run directory: the state dict to `out`, the timm
    model name and kwargs to `out` with suffix .json. Returns (out, sidecar, name, kwargs); raises
    before any work when `out` cannot be written, and before writing unless the export loads strictly into timm."""
    check_writable_file(out, "export (--out)")
    model = load_model(ckpt)
    create_timm_model(model)
    name, state_dict = export_timm(model)
    kwargs = timm_kwargs(model)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(state_dict, out)
    sidecar = out.with_suffix(".json")
    sidecar.write_text(json.dumps({"timm_model": name, "kwargs": {"num_classes": 0, **kwargs},
                                   "checkpoint": str(ckpt)}, indent=2) + "\n")
    return out, sidecar, name, kwargs


def timm_load_line(out: str | os.PathLike, name: str, kwargs: dict[str, Any]) -> str:
    """The Python line that loads an export written to `out` (a model registered outside timm needs its
    module imported first)."""
    module = timm.models.model_entrypoint(name).__module__
    imports = "" if module.startswith("timm.") else f"import {module}; "
    return (f"{imports}timm.create_model({name!r}, num_classes=0, **{kwargs})"
            f".load_state_dict(torch.load({str(out)!r}))")
