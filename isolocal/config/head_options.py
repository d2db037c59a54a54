"""Head options: the settings of one kind of stage head, declared by the head as a small dataclass and set
in a run config per head, `[model.head_options.<head>]`, for every stage that head trains.

`isolocal.heads.register_head(name, needs, build, options=MyOptions)` records the dataclass here
(`OPTIONS`), so a config is checked as soon as the head's module is imported, before any work: a key the
dataclass lacks is refused naming the valid ones, a value is type-checked as every config key is
(`isolocal.config.parse`), and a range a field declares with `option(default, at_least=..., above=...,
at_most=..., below=..., one_of=...)` is checked with a message naming the key. The dataclass's own
`__post_init__` may refuse combinations (raise ValueError). A table of a head that is not registered in
this process is checked by the stage plan, which knows every head and the installed packages' entry points
(`isolocal.heads.StagePlan`).

The shipped heads' options were flat model keys up to 0.2 (`model.num_classes`, `model.head_hidden`,
`model.proj_dim`, `model.temperature`). `FORMER_KEYS` maps each to its heads' tables, in run configs,
`--set`, checkpoints, `create_model(...)` and as `ModelConfig` arguments and attributes; given together
with the table, the flat key wins (it is what `--set` writes over a config file). An error about a value
given as a flat key names that key.
"""
from __future__ import annotations

import copy
import dataclasses
import operator
import typing
from typing import Any

from isolocal.config.parse import coerce
from isolocal.errors import ConfigError

OPTIONS: dict[str, type] = {}  # head name -> its options dataclass (`register_options`)
# A 0.2 flat model key -> the shipped heads whose option of that name it sets.
FORMER_KEYS: dict[str, tuple[str, ...]] = {
    "num_classes": ("classify",),
    "head_hidden": ("classify", "contrastive"),
    "proj_dim": ("contrastive",),
    "temperature": ("contrastive",),
}
# option(...) keyword -> how the message says it, and the test a value must pass
_BOUNDS: dict[str, tuple[str, Any]] = {"at_least": (">=", operator.ge), "above": (">", operator.gt),
                                       "at_most": ("<=", operator.le), "below": ("<", operator.lt)}
_GIVEN_AS = "_former_keys"  # instance attribute of a ModelConfig: (head, option) -> the flat key it came from


def option(default: Any, *, at_least: float | None = None, above: float | None = None,
           at_most: float | None = None, below: float | None = None, one_of: tuple | None = None) -> Any:
    """A field of a head's options dataclass: its default and the values a config may give it (bounds
    inclusive `at_least` / `at_most`, exclusive `above` / `below`; `one_of` lists the valid values)."""
    limits = {"at_least": at_least, "above": above, "at_most": at_most, "below": below, "one_of": one_of}
    metadata = {name: value for name, value in limits.items() if value is not None}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def register_options(head: str, options: type | None) -> None:
    """Record `head`'s options dataclass (None: the head takes none), refusing one that is not a dataclass
    or has a field without a default (a config may set none of them)."""
    if options is None:
        OPTIONS.pop(head, None)
        return
    if not (isinstance(options, type) and dataclasses.is_dataclass(options)):
        raise ValueError(f"head {head!r}: options must be a dataclass (the class itself), got {options!r}")
    bare = [f.name for f in dataclasses.fields(options)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if bare:
        raise ValueError(f"head {head!r}: every option needs a default, as a config may set none; "
                         f"{', '.join(bare)} of {options.__name__} have none")
    OPTIONS[head] = options


def set_former_key(model: Any, key: str, value: Any) -> None:
    """Write a 0.2 flat key's value into each of its heads' tables of `model.head_options`, remembering
    the key it was given as for error messages."""
    given = model.__dict__.setdefault(_GIVEN_AS, {})
    for head in FORMER_KEYS[key]:
        model.head_options.setdefault(head, {})[key] = value
        given[(head, key)] = f"model.{key}"


def option_key(model: Any, head: str, name: str) -> str:
    """How a message names option `name` of `head`: the flat key it was given as, else its table's key."""
    return model.__dict__.get(_GIVEN_AS, {}).get((head, name), f"model.head_options.{head}.{name}")


def resolve_options(model: Any, head: str) -> Any:
    """`head`'s options for `model` (a ModelConfig): its dataclass filled from `[model.head_options.<head>]`,
    every value checked; None when the head registered no options here."""
    cls = OPTIONS.get(head)
    if cls is None:
        return None
    table = model.head_options.get(head, {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - set(fields))
    if unknown:
        raise ConfigError(f"unknown option {option_key(model, head, unknown[0])}; the options of head {head!r} "
                          f"are {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in table.items():
        key = option_key(model, head, name)
        values[name] = coerce(value, hints[name], key)
        _check_limits(fields[name], values[name], key)
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:  # the options' own __post_init__ refused a combination
        raise ConfigError(f"model.head_options.{head}: {err}") from None


def _check_limits(field: dataclasses.Field, value: Any, key: str) -> None:
    limits = field.metadata
    if "one_of" in limits and value not in limits["one_of"]:
        raise ConfigError(f"{key} must be one of {', '.join(map(repr, limits['one_of']))}; got {value!r}")
    for name, (word, test) in _BOUNDS.items():
        if name in limits and not test(value, limits[name]):
            raise ConfigError(f"{key} must be {word} {limits[name]}, got {value}")


def check_head_options(model: Any) -> None:
    """Check the tables of the heads registered here (see the module docstring for the others)."""
    for head in model.head_options:
        resolve_options(model, head)
