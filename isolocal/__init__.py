"""isolocal: gradient-isolated local learning for masked image modeling (LocalMIM).

The model is `StagewiseEncoder` (its forward returns a `StageOutput`); `LocalMIM` and `MIMOutput` are
their former names, kept as aliases.
"""
from __future__ import annotations

from typing import Any

from isolocal.core import masking, targets
from isolocal.config import Boundary, ConfigError, ModelConfig, from_dict, to_dict
from isolocal.io.export import create_timm_model, export_timm, timm_kwargs
from isolocal.io.load import load_model
from isolocal.models.encoder import LocalMIM, MIMOutput, StageOutput, StagewiseEncoder
from isolocal.config.presets import list_models, preset_config

__version__ = "0.3.0.dev0"

# The documented name: the model of any isolocal checkpoint or run directory, or of a published LocalMIM
# checkpoint given its run config (load_checkpoint(path, cfg)).
load_checkpoint = load_model


def create_model(name: str, boundary: Boundary | None = None, **overrides: Any) -> StagewiseEncoder:
    """Build a preset, with any ModelConfig field overridden (unknown fields are errors)."""
    cfg = to_dict(preset_config(name))
    cfg.update(overrides)
    if boundary is not None:
        cfg["boundary"] = boundary
    return StagewiseEncoder(from_dict(ModelConfig, cfg))


def model_from_config(cfg: ModelConfig) -> StagewiseEncoder:
    return StagewiseEncoder(cfg)


__all__ = [
    "StagewiseEncoder", "StageOutput", "LocalMIM", "MIMOutput", "ModelConfig", "ConfigError", "create_model",
    "model_from_config", "list_models", "preset_config", "export_timm", "timm_kwargs", "create_timm_model", "targets",
    "masking", "load_checkpoint", "load_model",
]
