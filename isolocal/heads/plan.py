"""Each stage's local head, its options and the boundary in front of it, resolved once from a ModelConfig.

`model.objective`, `model.head_options` and `model.boundary` are parsed here and nowhere else: a model
keeps its plan (`model.plan`), and code that has only a config (the data checks before a run, a study
report) builds one. Bad values fail here, naming the value and what is valid, before any weights exist.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from isolocal.config import Boundary, ConfigError, ModelConfig
from isolocal.config.head_options import resolve_options
from isolocal.core.stages import parse_boundaries
from isolocal.heads.base import HEADS, HeadType, find_head, parse_objectives, skipped_head


@dataclass(frozen=True)
class StagePlan:
    objectives: tuple[str, ...]  # head name (`model.objective`) per stage
    alphas: tuple[float, ...]  # gradient scale per boundary (`model.boundary`): 1 global, 0 isolated
    # Stages whose head is not registered here, built without it (`skipped_head`): a model loaded for its encoder.
    skipped: tuple[int, ...] = ()
    options: tuple[Any, ...] = ()  # each stage's head options (`[model.head_options.<head>]`), None for none
    heads: tuple[HeadType, ...] = field(init=False, repr=False)  # the registry entry per stage
    needs: frozenset[str] = field(init=False)  # what the heads need from the data, together
    views: int = field(init=False)  # images per sample: 2 (stacked [view 1; view 2]) when a head contrasts views

    def __post_init__(self) -> None:
        heads = tuple(skipped_head(name) if k in self.skipped else HEADS[name]
                      for k, name in enumerate(self.objectives))
        needs = frozenset().union(*(head.needs for head in heads))
        object.__setattr__(self, "heads", heads)
        object.__setattr__(self, "needs", needs)
        object.__setattr__(self, "views", 2 if "views" in needs else 1)
        if {"grid", "mask"} <= needs:
            masked = [k for k, head in enumerate(heads) if "mask" in head.needs]
            raise ConfigError(f"model.objective {' / '.join(self.heads_needing('grid'))} reads every token of its "
                              f"stage's grid, but {' / '.join(self.heads_needing('mask'))} (stages {masked}) needs a "
                              "mask, under which the encoder reads the visible tokens only; train it beside heads that "
                              "need no mask")

    @classmethod
    def from_config(cls, cfg: ModelConfig, skip_missing: bool = False) -> StagePlan:
        """One stage per tap; boundaries are checked first, then objectives. `skip_missing`: a stage whose
        head is not registered gets none (listed in `skipped`) instead of failing."""
        count = len(cfg.taps)
        alphas = parse_boundaries(cfg.boundary, count - 1)
        objectives = parse_objectives(cfg.objective, count, skip_missing)
        check_option_tables(cfg, skip_missing)
        skipped = tuple(k for k, name in enumerate(objectives) if name not in HEADS)
        options = tuple(None if k in skipped else resolve_options(cfg, name) for k, name in enumerate(objectives))
        return cls(tuple(objectives), tuple(alphas), skipped, options)

    def with_boundary(self, spec: Boundary) -> StagePlan:
        """The same heads behind other boundaries."""
        return dataclasses.replace(self, alphas=tuple(parse_boundaries(spec, len(self.alphas))))

    @property
    def num_stages(self) -> int:
        return len(self.objectives)

    @property
    def isolated(self) -> bool:
        """True when no gradient crosses any boundary (stage-wise training is then exact)."""
        return all(a == 0.0 for a in self.alphas)

    def reconstructs(self, k: int) -> bool:
        """Whether stage k's head predicts a reconstruction target (its decoder, `stage.decoder`)."""
        return self.heads[k].reconstructs

    @property
    def target_stages(self) -> list[int]:
        """The stages whose heads need a reconstruction target."""
        return [k for k in range(self.num_stages) if self.reconstructs(k)]

    def check_micro_batch(self, samples: int, split: str) -> None:
        """Refuse a micro-batch of one sample when a head contrasts views: its negatives are the other samples
        of the micro-batch, so with none it has nothing to contrast and its loss is exactly 0. `split` says
        how the micro-batch size came about, for the message."""
        if "views" in self.needs and samples < 2:
            raise ConfigError(f"model.objective {' / '.join(self.heads_needing('views'))} takes each image's "
                              f"negatives from the other images of its micro-batch, and a micro-batch here holds "
                              f"{samples} ({split}); raise train.batch_size so that it holds at least 2")

    def heads_needing(self, need: str) -> list[str]:
        """The names of the heads that need `need`, quoted, for error messages."""
        return sorted({repr(name) for name, head in zip(self.objectives, self.heads) if need in head.needs})


def check_option_tables(cfg: ModelConfig, skip_missing: bool = False) -> None:
    """Every `[model.head_options.<head>]` names a registered head that takes options, and holds valid ones
    (for every registered head, whether or not a stage trains it: a study's base may set them for its
    variants). `skip_missing`: tables of heads not registered here are left alone (a model loaded for its
    encoder)."""
    for name in cfg.head_options:
        head = find_head(name)
        if head is None:
            if skip_missing:
                continue
            raise ConfigError(f"model.head_options.{name}: no head {name!r} is registered; valid heads: "
                              f"{', '.join(sorted(HEADS))}; a head of your own: import its module with --import "
                              "MODULE_OR_PATH or imports = [...] in the run config")
        if head.options is None:
            given = ", ".join(sorted(cfg.head_options[name])) or "an empty table"
            raise ConfigError(f"model.head_options.{name}: head {name!r} takes no options, got {given}; remove "
                              "the table")
        resolve_options(cfg, name)
