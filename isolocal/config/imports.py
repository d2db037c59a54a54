"""User code a run needs in every process: the modules and files named by `imports` / `--import`.

A head of one's own is registered by its module (`isolocal.heads.register_head`), which must then be
imported in every process that builds the model: the command's, a study's run processes, each rank of a
launch. So a run config lists them (`imports = ["my_heads", "path/to/heads.py"]`), the command line adds
to them (`--import`), and the resolved list (files as absolute paths) is written with the run's config
(`config.toml`, `run.json`, checkpoints), from which every later process imports them first.

An entry ending in `.py` or holding a path separator is a file, imported from its location; a relative
path is resolved against the directory of the config file that lists it, and against the working
directory when it comes from `--import` or `--set`. Any other entry is a module name, imported as
`import` would (`sys.path`, `PYTHONPATH`, installed packages). Importing is done once per process; a
module that fails to import is one ConfigError line naming it and the error.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from isolocal.errors import ConfigError


def is_file(spec: str) -> bool:
    """Whether an `imports` entry names a file (else a module)."""
    return spec.endswith(".py") or "/" in spec or os.sep in spec


def resolve_imports(specs: object, base: str | os.PathLike, key: str = "imports") -> list[str]:
    """`specs` checked to be a list of non-empty strings, files made absolute against `base`, duplicates dropped;
    `key` names the setting in errors."""
    if not isinstance(specs, list):
        raise ConfigError(f"{key}: {specs!r} has the wrong type; expected a list of module names or .py paths")
    resolved: list[str] = []
    for i, spec in enumerate(specs):
        if not isinstance(spec, str) or not spec.strip():
            raise ConfigError(f"{key}[{i}]: {spec!r} is not a module name or a .py path")
        spec = spec.strip()
        if is_file(spec):
            spec = str((Path(base) / spec).resolve())
        if spec not in resolved:
            resolved.append(spec)
    return resolved


def _module_name(path: Path) -> str:
    """A file's module name: its stem, made unique by its path, so two files of one name both load."""
    return f"isolocal_import_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"


def _import_file(path: Path) -> None:
    name = _module_name(path)
    if name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # as `import` does: code that looks itself up while it runs finds itself
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise


def import_modules(specs: Sequence[str]) -> None:
    """Import every resolved `imports` entry (see `resolve_imports`) that this process has not imported yet."""
    for spec in specs:
        if is_file(spec) and not Path(spec).is_file():
            raise ConfigError(f"imports: cannot import {spec!r}: no such file")
        try:
            if is_file(spec):
                _import_file(Path(spec))
            else:
                importlib.import_module(spec)
        except Exception as err:  # the user's code may raise anything: one line naming it
            raise ConfigError(f"imports: cannot import {spec!r}: {_describe(err, spec)}") from None


def _describe(err: Exception, spec: str) -> str:
    lines = str(err).strip().splitlines()
    text = f"{type(err).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    if isinstance(err, ModuleNotFoundError) and err.name == spec.split(".")[0]:
        text += " (module names are looked up on sys.path and PYTHONPATH; give a file by its path, e.g. ./my_heads.py)"
    return text


def load_imports(specs: object, base: str | os.PathLike | None = None, key: str = "--import") -> list[str]:
    """`resolve_imports` (relative files against `base`, the working directory when None), then `import_modules`;
    returns the resolved list, as a run's config records it."""
    resolved = resolve_imports(specs, Path.cwd() if base is None else base, key)
    import_modules(resolved)
    return resolved
