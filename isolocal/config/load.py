"""Run recipes: a TOML run config plus `--set` overrides, with the preset it names resolved, validated.

The schema knows no model; presets live in `isolocal.config.presets`; this module joins the two, so a
recipe names a preset and overrides any of its fields.
"""
from __future__ import annotations

from pathlib import Path

from isolocal.config.parse import apply_overrides, from_dict, read_toml
from isolocal.config.presets import resolve_model_config
from isolocal.config.schema import RunConfig
from isolocal.config.validate import validate_run


def load_run_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a TOML run config (or the defaults), apply overrides, resolve the preset, validate."""
    data = apply_overrides({} if path is None else read_toml(path), overrides or [])
    cfg = from_dict(RunConfig, data)
    cfg.model = resolve_model_config(cfg.preset, data.get("model", {}))
    validate_run(cfg)
    return cfg
