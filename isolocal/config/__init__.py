"""Every knob as a dataclass; TOML files plus `--set a.b=c` overrides; strict validation.

- `schema`: the sections (`RunConfig` of `ModelConfig`, `DataConfig`, `TrainConfig`, `PipelineConfig`,
  `EvalConfig`) and which model family reads which model field;
- `parse`: dicts (TOML) to dataclasses and back, overrides; `validate`: ranges, one function per section;
- `presets`: the named ModelConfigs; `load`: `load_run_config`, a recipe with its preset resolved;
- `toml`: writing a resolved config; `imports`: the user modules a run imports first (`imports`, `--import`).
Only `presets` and `load` know the preset names; no module here builds a model.
"""
from isolocal.config.load import load_run_config
from isolocal.config.parse import apply_overrides, from_dict, read_toml, to_dict
from isolocal.config.schema import (
    FAMILY_FIELDS,
    Boundary,
    DataConfig,
    EvalConfig,
    ModelConfig,
    Objective,
    PipelineConfig,
    RunConfig,
    TrainConfig,
)
from isolocal.config.validate import validate_run
from isolocal.errors import ConfigError

__all__ = [
    "FAMILY_FIELDS", "Boundary", "ConfigError", "DataConfig", "EvalConfig", "ModelConfig", "Objective",
    "PipelineConfig", "RunConfig", "TrainConfig", "apply_overrides", "from_dict", "load_run_config", "read_toml",
    "to_dict", "validate_run",
]
