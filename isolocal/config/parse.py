"""Reading configs: nested dicts (TOML) to the schema's dataclasses and back, and `--set a.b=c` overrides.

Strict on purpose: an unknown key or a wrong type is a ConfigError that names the key, because a
typo that silently falls back to a default wastes a whole run.
"""
from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Union

from isolocal.errors import ConfigError


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected. `key` names
    the value in errors."""
    if isinstance(tp, dataclasses.InitVar):  # an init-only argument (a former key): its declared type
        tp = tp.type
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = [o for o in typing.get_args(tp) if o is not type(None)]
        if value is None and len(options) < len(typing.get_args(tp)):
            return None
        if len(options) == 1:  # `X | None`: X's own error names the exact key (e.g. model.depth)
            return coerce(value, options[0], key)
        for option in options:
            try:
                return coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} has the wrong type; expected {tp}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: {value!r} has the wrong type; expected a list")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: {value!r} has the wrong type; expected a table")
        item_tp = (typing.get_args(tp) or (str, Any))[1]
        return {k: coerce(v, item_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: {value!r} has the wrong type; expected a list")
        return list(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: {value!r} has the wrong type; expected true or false")
    if tp is int and isinstance(value, bool):
        raise ConfigError(f"{key}: {value!r} has the wrong type; expected int")
    if not isinstance(value, tp):
        raise ConfigError(f"{key}: {value!r} has the wrong type; expected {_type_name(tp)}")
    return value


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict; unknown keys and wrong types raise ConfigError. Init-only
    arguments (`dataclasses.InitVar`: keys accepted but not stored, e.g. `ModelConfig`'s former keys) are
    accepted too, and not listed among the valid keys."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    init_only = {name for name, tp in hints.items() if isinstance(tp, dataclasses.InitVar)}
    unknown = sorted(set(data) - names - init_only)
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]}; valid keys here: {', '.join(sorted(names))}"
        )
    return cls(**{k: coerce(v, hints[k], prefix + k) for k, v in data.items()})


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (TOML-writable: None entries are dropped)."""
    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if v is not None}
        return value
    return clean(dataclasses.asdict(cfg))


def _parse_value(text: str) -> Any:
    """`--set` values are TOML literals (3, 1e-4, true, [1, 2], "x"); bare words are strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def read_toml(path: str | Path, what: str = "config file") -> dict:
    """A TOML file as a dict; a missing or malformed file is a ConfigError naming it as `what`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{what} {path} is not valid TOML: {err}") from None


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b=c` overrides to a nested dict in place and return it."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}: {part} is not a table")
        node[parts[-1]] = _parse_value(text.strip())
    return data
