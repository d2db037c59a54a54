"""The stage-head contract: what a local objective receives from its stage and what it needs from the data.

A stage's head reads the stage's output (normalized tokens (B, N, C) with `prefix` leading non-grid
tokens, e.g. ViT's CLS, or a feature map (B, C, H, W)) and returns its local loss. What else it needs
it declares in `needs`, so that a run can check before any work that its data provides it, and a
pipeline rank can be sent only what its own heads read:
- "target": the reconstruction target at the head's scale (`isolocal.core.targets`);
- "mask": the encoder runs on the visible tokens of an explicit, seeded mask;
- "labels": one class index per image;
- "views": two augmented views of every image, stacked along the batch as [view 1; view 2].

Heads are looked up by name (`model.objective`) in a registry, one entry per stage or one for all. A
head of one's own is registered by its module, which a run imports in each of its processes (`imports` /
`--import`, `isolocal.config.imports`), or by an installed package through the entry-point group
`isolocal.heads`, loaded once, the first time a name is looked up that the registry does not hold.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import ClassVar

import torch
from torch import Tensor, nn

from isolocal.config import ConfigError, ModelConfig

NEEDS = ("target", "mask", "labels", "views")


@dataclass
class HeadInputs:
    """What a head may read besides its stage's output; fields a head does not need may be None."""

    prefix: int = 0  # leading tokens that are not on the token grid (ViT's CLS)
    labels: Tensor | None = None  # (B,) class indices, repeated over views
    views: int = 1  # images per sample, stacked along the batch: [view 1; view 2; ...]


@dataclass
class HeadOutput:
    loss: Tensor
    pred: Tensor | None = None  # what the head predicts (logits, projections, reconstructions)
    logs: dict[str, Tensor] = field(default_factory=dict)


class StageHead(nn.Module, ABC):
    """A local objective reading one stage's output. Subclasses set `needs` (a subset of `NEEDS`)."""

    needs: ClassVar[frozenset[str]] = frozenset()

    @abstractmethod
    def loss(self, features: Tensor, inputs: HeadInputs) -> HeadOutput:
        """The head's local loss on its stage's normalized output."""


@dataclass(frozen=True)
class HeadType:
    """A registry entry: the head's needs and how to build it for a stage of width `dim`. A head that needs
    the reconstruction target (`mim`) is a decoder at the family's grid, which the family builds: its
    `build` is None."""

    needs: frozenset[str]
    build: Callable[[ModelConfig, int], StageHead] | None

    @property
    def reconstructs(self) -> bool:
        """Predicts the reconstruction target with the family's decoder (kept as `stage.decoder`)."""
        return "target" in self.needs


HEADS: dict[str, HeadType] = {}
ENTRY_POINT_GROUP = "isolocal.heads"  # installed packages' heads: `name = "module"` or `name = "module:function"`
_entry_points_loaded = False


def register_head(name: str, needs: frozenset[str], build: Callable[[ModelConfig, int], StageHead] | None) -> None:
    """Add a head type under `name` (a `model.objective` value)."""
    unknown = set(needs) - set(NEEDS)
    if unknown:
        raise ValueError(f"head {name!r} needs {sorted(unknown)}, which no runner provides; valid needs: {NEEDS}")
    if ("target" in needs) != (build is None):
        raise ValueError(f"head {name!r}: a head that needs 'target' is the model family's decoder (build=None); "
                         "any other head needs a build function")
    HEADS[name] = HeadType(frozenset(needs), build)


def load_entry_points() -> None:
    """Load the `isolocal.heads` entry points of the installed packages, once: each names a module, whose
    `register_head` calls run on import, or a function of no arguments, which is called."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    for point in entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = point.load()
            if point.attr is not None:
                loaded()
        except Exception as err:  # a package's code may raise anything: one line naming the entry point
            raise ConfigError(f"entry point {point.name} = {point.value!r} (group {ENTRY_POINT_GROUP}) failed to "
                              f"load: {type(err).__name__}: {err}") from None
    _entry_points_loaded = True


def find_head(name: str) -> HeadType | None:
    """The registry's entry for `name`, looking in the installed packages' entry points when it has none."""
    if name not in HEADS:
        load_entry_points()
    return HEADS.get(name)


def parse_objectives(spec: str | list, count: int, skip_missing: bool = False) -> list[str]:
    """`model.objective`: one head name for every stage, or a list with one per stage -> a list of names.
    `skip_missing` lets names through that no head is registered under (a model loaded for its encoder)."""
    items = spec if isinstance(spec, list) else [spec] * count
    if len(items) != count:
        raise ValueError(f"model.objective must have one entry per stage ({count}), got {len(items)}: {spec}")
    for item in items:
        if find_head(item) is None and not (skip_missing and isinstance(item, str)):
            raise ValueError(f"model.objective {item!r} is not a head; valid heads: {', '.join(sorted(HEADS))}; "
                             "a head of your own: import its module with --import MODULE_OR_PATH or "
                             "imports = [...] in the run config")
    return list(items)


class SkippedHead(StageHead):
    """Stands in for a head whose type is not registered in this process (its module not imported) in a
    model loaded for its encoder only: no parameters, and a loss that says how to get the head."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def loss(self, features: Tensor, inputs: HeadInputs) -> HeadOutput:
        raise ValueError(f"this stage's head {self.name!r} was skipped when the model was loaded, as no head of "
                         "that name is registered here: the model serves its encoder only; import the head's "
                         "module (--import MODULE_OR_PATH / imports = [...]) for the whole model")


def skipped_head(name: str) -> HeadType:
    """The registry entry a stage gets when head `name` is skipped: a `SkippedHead`, needing nothing."""
    return HeadType(frozenset(), lambda cfg, dim: SkippedHead(name))


def pool(features: Tensor, prefix: int) -> Tensor:
    """One vector per image: the mean over the token grid (tokens after `prefix`) or over a map's H, W."""
    if features.dim() == 4:
        return features.mean(dim=(2, 3))
    return features[:, prefix:].mean(dim=1)


def mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """The small two-layer MLP both shipped heads put on pooled features (hidden 0 = the stage width)."""
    hidden = hidden or in_dim
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))


def as_labels(labels: Tensor | None, batch: int, views: int) -> Tensor | None:
    """(B / views,) integer labels -> (B,), repeated per view (the batch is [view 1; view 2; ...]). None
    stays None: a forward that runs no labelled head's loss (analysis) needs none."""
    if labels is None:
        return None
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.dim() != 1:
        raise TypeError(f"labels must be a 1-D integer tensor, got {labels.dtype} of shape {tuple(labels.shape)}")
    if labels.shape[0] * views != batch:
        raise ValueError(f"labels must have one entry per sample ({batch // views}), got {labels.shape[0]}")
    return labels.repeat(views)


def attach_head(stage: nn.Module, head: HeadType, cfg: ModelConfig, dim: int, decoder: Callable[[], nn.Module]) -> None:
    """Give a stage of width `dim` its head: a reconstructing head (`mim`) is the family's `decoder()`, kept
    as `stage.decoder` (the keys of every checkpoint); any other is the registry's head, `stage.head`."""
    if head.reconstructs:
        stage.decoder = decoder()
    else:
        stage.head = head.build(cfg, dim)
