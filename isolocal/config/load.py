"""Run recipes: a TOML run config plus `--set` overrides, with the preset it names resolved, validated.

The schema knows no model; presets live in `isolocal.config.presets`; this module joins the two, so a
recipe names a preset and overrides any of its fields. The recipe's `imports` (and `--import`) are
imported first (`isolocal.config.imports`), so heads registered there are known to everything after.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from isolocal.config.imports import load_imports, resolve_imports
from isolocal.config.parse import apply_overrides, from_dict, read_toml
from isolocal.config.presets import resolve_model_config
from isolocal.config.schema import RunConfig
from isolocal.config.validate import validate_run


def load_run_config(path: str | Path | None = None, overrides: list[str] | None = None,
                    imports: Sequence[str] = ()) -> RunConfig:
    """Read a TOML run config (or the defaults), apply overrides, import the config's `imports` and then
    `imports` (`--import`), resolve the preset, validate. Relative files resolve against the config file's
    directory when the file lists them, against the working directory when `--set` or `--import` does."""
    data = {} if path is None else read_toml(path)
    if "imports" in data:
        data["imports"] = resolve_imports(data["imports"], Path(path).resolve().parent)
    data = apply_overrides(data, overrides or [])
    data["imports"] = load_imports([*resolve_imports(data.get("imports", []), Path.cwd()), *imports])
    cfg = from_dict(RunConfig, data)
    cfg.model = resolve_model_config(cfg.preset, data.get("model", {}))
    validate_run(cfg)
    return cfg
