"""TOML output for resolved run configs, with or without the optional `tomli_w` package.

`tomli_w` is used when installed. Machines prepared only for training (torch, timm, scipy, pandas,
...) often lack it and cannot always install it (no network), and a run must not fail at its first
line for a file it writes for later. So without it, a small writer covers exactly what configs hold
(tables of strings, numbers, booleans and arrays of those) and the text is parsed back with the
standard library's `tomllib`: a value it cannot represent is an error, never a silently wrong file.
"""
from __future__ import annotations

import json
import math
import tomllib
from typing import Any


def dumps_toml(data: dict[str, Any]) -> str:
    """`data` as TOML text that `tomllib.loads` reads back equal to `data`."""
    try:
        import tomli_w  # optional: the hand-written writer below is used without it
    except ImportError:
        pass
    else:
        return tomli_w.dumps(data)
    text = "".join(_table(data, ()))
    if tomllib.loads(text) != data:
        raise ValueError("the config holds a value this TOML writer cannot represent; pip install tomli-w")
    return text


def _table(table: dict[str, Any], path: tuple[str, ...]) -> list[str]:
    """Scalars of a table first, then its sub-tables under [dotted.headers]."""
    lines = [f"{_key(k)} = {_value(v)}\n" for k, v in table.items() if not isinstance(v, dict)]
    for k, v in table.items():
        if isinstance(v, dict):
            sub = (*path, k)
            lines += [f"\n[{'.'.join(map(_key, sub))}]\n", *_table(v, sub)]
    return lines


def _key(key: str) -> str:
    bare = key.replace("_", "").replace("-", "").isalnum() and key.isascii()
    return key if bare else json.dumps(key)


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("nan" if math.isnan(v) else "inf" if v > 0 else "-inf")
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    raise ValueError(f"cannot write {type(v).__name__} value {v!r} to TOML; pip install tomli-w")
