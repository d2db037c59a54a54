"""isolocal: gradient-isolated local learning for masked image modeling (LocalMIM).

The model is `StagewiseEncoder` (its forward returns a `StageOutput`); `LocalMIM` and `MIMOutput` are
their former names, kept as aliases. `load_checkpoint` is `load_model`: the model of any isolocal
checkpoint or run directory, or of a published LocalMIM checkpoint given its run config.

The names below are imported on first use (PEP 562), so that `isolocal --help` and a config error do
not pay for torch: `import isolocal` alone imports nothing heavy.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.3.0.dev0"

# public name -> (module, attribute in it; None: the module itself)
_EXPORTS: dict[str, tuple[str, str | None]] = {
    "StagewiseEncoder": ("isolocal.models.encoder", "StagewiseEncoder"),
    "StageOutput": ("isolocal.models.encoder", "StageOutput"),
    "LocalMIM": ("isolocal.models.encoder", "LocalMIM"),
    "MIMOutput": ("isolocal.models.encoder", "MIMOutput"),
    "create_model": ("isolocal.models.encoder", "create_model"),
    "model_from_config": ("isolocal.models.encoder", "StagewiseEncoder"),
    "ModelConfig": ("isolocal.config", "ModelConfig"),
    "ConfigError": ("isolocal.errors", "ConfigError"),
    "list_models": ("isolocal.config.presets", "list_models"),
    "preset_config": ("isolocal.config.presets", "preset_config"),
    "export_timm": ("isolocal.io.export", "export_timm"),
    "timm_kwargs": ("isolocal.io.export", "timm_kwargs"),
    "create_timm_model": ("isolocal.io.export", "create_timm_model"),
    "load_model": ("isolocal.io.load", "load_model"),
    "load_checkpoint": ("isolocal.io.load", "load_model"),
    "targets": ("isolocal.core.targets", None),
    "masking": ("isolocal.core.masking", None),
}
__all__ = [  # = sorted(_EXPORTS)
    "ConfigError", "LocalMIM", "MIMOutput", "ModelConfig", "StageOutput", "StagewiseEncoder", "create_model",
    "create_timm_model", "export_timm", "list_models", "load_checkpoint", "load_model", "masking",
    "model_from_config", "preset_config", "targets", "timm_kwargs",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'isolocal' has no attribute {name!r}")
    module, attribute = _EXPORTS[name]
    value = importlib.import_module(module)
    value = value if attribute is None else getattr(value, attribute)
    globals()[name] = value  # the next access is a plain lookup
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # what the names are, for type checkers and editors
    from isolocal.config import ModelConfig
    from isolocal.config.presets import list_models, preset_config
    from isolocal.core import masking, targets
    from isolocal.errors import ConfigError
    from isolocal.io.export import create_timm_model, export_timm, timm_kwargs
    from isolocal.io.load import load_model
    from isolocal.io.load import load_model as load_checkpoint
    from isolocal.models.encoder import LocalMIM, MIMOutput, StageOutput, StagewiseEncoder, create_model
    from isolocal.models.encoder import StagewiseEncoder as model_from_config
