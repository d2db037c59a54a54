"""The stage-head contract: what a local objective receives from its stage and what it needs from the data.

A stage's head reads the stage's output (normalized tokens (B, N, C) with `prefix` leading non-grid
tokens, e.g. ViT's CLS, or a feature map (B, C, H, W)) and returns its local loss. What else it needs
it declares once, in `register_head`'s `needs`, so that a run can check before any work that its data
provides it, and a pipeline rank can be sent only what its own heads read:
- "target": the reconstruction target at the head's scale (`isolocal.core.targets`);
- "mask": the encoder runs on the visible tokens of an explicit, seeded mask;
- "labels": one class index per image;
- "views": two augmented views of every image, stacked along the batch as [view 1; view 2];
- "image": the images the encoder reads, normalized as the loader gives them (to reconstruct them);
- "grid": every token of the stage's grid (to lay them out as a map): no head of the model may need the
  mask, under which the encoder reads the visible tokens only;
- "next_stage": the live layers of the next stage (`ModelView.next_stage`, e.g. to keep an EMA copy of
  them): a pipeline, whose next stage may train on another rank, refuses it.

Its settings are an options dataclass, set per head in `[model.head_options.<name>]`
(`isolocal.config.head_options`); `register_head` documents the whole contract.

Heads are looked up by name (`model.objective`) in a registry, one entry per stage or one for all. A
head of one's own is registered by its module, which a run imports in each of its processes (`imports` /
`--import`, `isolocal.config.imports`), or by an installed package through the entry-point group
`isolocal.heads`, loaded once, the first time a name is looked up that the registry does not hold.

A head that reads the model beyond its own stage (copies of later layers, another stage's parameters)
gets it through `StageHead.bind(view)`, called once when the model is built, with a `ModelView`: never
by importing the model's internals. `StageHead.after_step()` runs after every optimizer step.
"""
from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points

import torch
from torch import Tensor, nn

from isolocal.config import ConfigError, ModelConfig
from isolocal.config.head_options import register_options, resolve_options

NEEDS = ("target", "mask", "labels", "views", "image", "grid", "next_stage")


@dataclass
class HeadInputs:
    """What a head may read besides its stage's output; fields a head does not need may be None."""

    prefix: int = 0  # leading tokens that are not on the token grid (ViT's CLS)
    labels: Tensor | None = None  # (B,) class indices, repeated over views
    views: int = 1  # images per sample, stacked along the batch: [view 1; view 2; ...]
    images: Tensor | None = None  # (B, C, H, W) the normalized input images, one per row of the features


@dataclass
class HeadOutput:
    """What a head's `loss` returns (see `register_head`)."""

    loss: Tensor  # a scalar: what this stage's parameters are trained on
    pred: Tensor | None = None  # what the head predicts (logits, projections, reconstructions)
    logs: dict[str, Tensor | float] = field(default_factory=dict)  # scalars logged per stage (`log_<key>_stage`)


# (the layer the copies read the output of, backbone layers to copy, width ratio) -> (fresh layers, their width)
LayerCopier = Callable[[int, Sequence[int], float], tuple[nn.Module, int]]


@dataclass(frozen=True)
class ModelView:
    """What `StageHead.bind` may read of the model beyond the head's own stage: the backbone's layers per
    stage, fresh copies of later ones (built from the config, so they work on every runner), and, for a head
    needing "next_stage", the next stage's live layers. The model family supplies both (`copier`,
    `next_layers`); a family that does not is refused by name when a head asks."""

    head: str  # the head's name (`model.objective`), for messages
    arch: str  # the model family (`model.arch`)
    stage: int  # the stage whose head is bound
    stage_layers: tuple[range, ...]  # each stage's backbone layers (ViT and ResNet: blocks), global indices
    copier: LayerCopier | None = None  # the family's, for this model; None: it makes no copies
    needs_next: bool = False  # the head needs "next_stage"
    next_layers: nn.Module | None = None  # the next stage's layers, live; None: the family offers none (or last stage)

    @property
    def num_stages(self) -> int:
        return len(self.stage_layers)

    @property
    def later_layers(self) -> range:
        """The backbone layers after this stage (those of stages stage + 1 .. K - 1)."""
        return range(self.stage_layers[self.stage].stop, self.stage_layers[-1].stop)

    def copy_layers(self, layers: Sequence[int], width: float = 1.0) -> tuple[nn.Module, int]:
        """Fresh, trainable layers with the architecture of the backbone's `layers` (some of `later_layers`,
        increasing), `width` times as wide, reading this stage's features; initialised as the family
        initialises its own; and the width of their output. ResNet: residual blocks, each halving the
        resolution at most once to follow the backbone's downsampling; ViT: transformer blocks (a linear
        map first when the width changes) and a final LayerNorm, like a stage's features."""
        if self.copier is None:
            raise ConfigError(f"model.objective {self.head!r} builds copies of the backbone's later layers, which "
                              f"the {self.arch} family does not offer; use it on a resnet or vit model")
        later, layers = self.later_layers, list(layers)
        if not layers or layers != sorted(set(layers)) or layers[0] < later.start or layers[-1] >= later.stop:
            raise ValueError(f"layers to copy must be increasing indices of the layers after stage {self.stage} "
                             f"({later.start} to {later.stop - 1}), got {layers}")
        if not width > 0:
            raise ValueError(f"the copies' width ratio must be > 0, got {width}")
        return self.copier(self.stage_layers[self.stage][-1], layers, width)

    def next_stage(self) -> nn.Module:
        """The next stage's layers up to its features (ViT: its blocks and norm; ResNet: its blocks), live:
        the module the model trains. Read it (copy it, average it); never train it, and keep it out of the
        head's own modules (a plain attribute such as a tuple), or its parameters would become the head's.
        Only for a head needing "next_stage", on a stage that has a next one."""
        if not self.needs_next:
            raise ValueError(f"head {self.head!r} reads the next stage's layers without needing 'next_stage'; "
                             "declare it in register_head's needs")
        if self.stage == self.num_stages - 1:
            raise ValueError(f"stage {self.stage} is the last one: it has no next stage")
        if self.next_layers is None:
            raise ConfigError(f"model.objective {self.head!r} reads the next stage's live layers, which the "
                              f"{self.arch} family does not offer; use it on a resnet or vit model")
        return self.next_layers


class StageHead(nn.Module, ABC):
    """A local objective reading one stage's output; what it needs from the data is declared once, when it
    is registered (`register_head`)."""

    @abstractmethod
    def loss(self, features: Tensor, inputs: HeadInputs) -> HeadOutput:
        """The head's local loss on its stage's normalized output."""

    def bind(self, view: ModelView) -> None:
        """Called once, when the model has built and initialised every stage, before any training or
        loading: a head that reads the model beyond its own stage builds what it needs here (see
        `register_head`). The default needs nothing."""

    def after_step(self) -> None:
        """Called after every optimizer step that updated the stages' parameters (under `torch.no_grad`),
        by every runner. The default does nothing."""


@dataclass(frozen=True)
class HeadType:
    """A registry entry (`register_head`): the head's name, needs, how to build it for a stage of width `dim`
    and its options dataclass. A head that needs the reconstruction target (`mim`) is a decoder at the
    family's grid, which the family builds: its `build` is None."""

    name: str
    needs: frozenset[str]
    build: Callable[..., StageHead] | None
    options: type | None = None

    @property
    def reconstructs(self) -> bool:
        """Predicts the reconstruction target with the family's decoder (kept as `stage.decoder`)."""
        return "target" in self.needs

    def make(self, cfg: ModelConfig, dim: int, stage: int = 0) -> StageHead:
        """The head of stage `stage`, of width `dim`: `build(cfg, dim)`, or `build(cfg, dim, options)` for a
        head registered with options (its `[model.head_options.<name>]`, resolved and checked); a build
        that takes a `stage` argument also gets `stage=` (see `register_head`)."""
        args = (cfg, dim) if self.options is None else (cfg, dim, resolve_options(cfg, self.name))
        return self.build(*args, **({"stage": stage} if takes_stage(self.build) else {}))


HEADS: dict[str, HeadType] = {}
ENTRY_POINT_GROUP = "isolocal.heads"  # installed packages' heads: `name = "module"` or `name = "module:function"`
_entry_points_loaded = False


def register_head(name: str, needs: Iterable[str], build: Callable[..., StageHead] | None,
                  options: type | None = None) -> None:
    """Make head `name` a value of `model.objective` (for every stage, or in its per-stage list).

    - `needs`: what the head reads besides its stage's output, a subset of `NEEDS` ("target", "mask",
      "labels", "views", "image", "grid", "next_stage"; see the module docstring). It is declared here and
      only here: a run checks before any work that its data provides it (labels: a labelled dataset with at
      most the head's `num_classes` classes, if its options have one; views: two augmented views of every
      image; the image: every data set; the next stage: not a pipeline) and that no head needs the mask where
      one needs the whole grid; a model with no head needing "mask" encodes whole images, so
      `model(images)` needs no mask.
      A head needing "target" reconstructs: it is the family's decoder (`mim`), `build` is None, and the
      registry's `reconstructs` says so.
    - `build(cfg, dim)` -> a `StageHead` (an `nn.Module`) for one stage: `cfg` is the model's
      `ModelConfig` (e.g. `cfg.arch`), `dim` the stage's output width (tokens (B, N, dim) or maps
      (B, dim, H, W)). It is called once per stage the head trains, in stage order, under the model's seeded
      initialisation; its parameters are the stage's (`stages.<k>.head.*` in checkpoints). A build that
      declares a parameter `stage` is also given the index of the stage it builds for (of
      `len(cfg.taps)` stages): a head whose objective changes with depth (`infopro`).
    - The model beyond the head's stage: a head may override `StageHead.bind(view)`, called once when the
      model has built and initialised all its stages (before any training or loading), with a `ModelView`:
      each stage's backbone layers (`stage_layers`, `later_layers`), `copy_layers(layers, width)` (fresh,
      trainable layers of the backbone's architecture, built from the config, so they work on every runner:
      `auglocal`) and, for a head needing "next_stage", `next_stage()` (the next stage's live layers, to read
      only: `man` keeps an EMA of them). Modules it creates there are the stage's (in checkpoints, trained with
      the stage unless their parameters do not require gradients) and are initialised by their creator
      (`copy_layers` as the family initialises its own layers). A family that offers no copies or no live
      layers (Swin) makes the view raise a ConfigError naming it.
    - `StageHead.after_step()`: called after every optimizer step, by every runner, under `torch.no_grad`
      (an EMA's update); a step whose update is dropped (a non-finite loss) does not call it.
    - `options`: a dataclass of the head's settings, every field with a default (`option(default,
      at_least=..., above=..., at_most=..., below=..., one_of=...)` declares a range). A config sets them
      in `[model.head_options.<name>]`, for every stage of this head; keys, types and ranges are checked
      before any work (`isolocal.config.head_options`). With options, `build(cfg, dim, options)` receives
      the resolved instance.

    The head's `loss(features, inputs)` reads the stage's normalized output and a `HeadInputs` (`prefix`
    non-grid tokens such as ViT's CLS, `labels` repeated over views, `views`, `images` when it needs "image")
    and returns a `HeadOutput`:
    `loss`, a scalar tensor (the stage's local loss; isolated boundaries keep its gradient inside the
    stage); `pred`, what it predicts (returned by `model(..., return_pred=True)`), or None; `logs`, a dict
    of scalars (0-d tensors or floats, the same keys every call) that each training step logs per stage as
    `log_<key>_stage` in `metrics.jsonl` (the mean over the step's micro-batches and processes; null for
    stages whose head has no such key) and a study reports as the per-stage metric `log_<key>`. Keys are
    letters, digits and underscores. Logs are read from the device only when a record is written.
    A head that predicts classes also has `logits(features, prefix)` -> (B, classes) scores, which
    `isolocal eval head` scores (`classify`, `dgl`, `auglocal`; a `logits` that is None: none).

    Registering a name again replaces its entry. A module registering heads is imported by every process
    of a run through `imports` / `--import` or an installed package's entry point (the module docstring).
    """
    needs = frozenset(needs)
    unknown = needs - set(NEEDS)
    if unknown:
        raise ValueError(f"head {name!r} needs {sorted(unknown)}, which no runner provides; valid needs: {NEEDS}")
    if ("target" in needs) != (build is None):
        raise ValueError(f"head {name!r}: a head that needs 'target' is the model family's decoder (build=None); "
                         "any other head needs a build function")
    if build is not None:
        _check_build(name, build, options)
    register_options(name, options)
    HEADS[name] = HeadType(name, needs, build, options)


def _check_build(name: str, build: Callable[..., StageHead], options: type | None) -> None:
    """`build` must take what it will be given: (cfg, dim), and the options when the head has them."""
    try:
        signature = inspect.signature(build)
    except (TypeError, ValueError):  # a builtin or C callable: nothing to read, it fails at its first call
        return
    args = ("cfg", "dim", "options") if options is not None else ("cfg", "dim")
    try:
        signature.bind(*args, **({"stage": 0} if "stage" in signature.parameters else {}))
    except TypeError:
        raise ValueError(f"head {name!r}: build{signature} cannot be called as build({', '.join(args)})"
                         + ("; a head registered with options gets them as a third argument" if options else "")
                         ) from None


def takes_stage(build: Callable[..., StageHead]) -> bool:
    """Whether `build` declares a `stage` parameter (the stage index it builds a head for)."""
    try:
        return "stage" in inspect.signature(build).parameters
    except (TypeError, ValueError):  # a builtin or C callable: it takes what every build takes
        return False


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
    return HeadType(name, frozenset(), lambda cfg, dim: SkippedHead(name))


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


def attach_head(stage: nn.Module, head: HeadType, cfg: ModelConfig, dim: int, decoder: Callable[[], nn.Module],
                index: int) -> None:
    """Give stage `index`, of width `dim`, its head: a reconstructing head (`mim`) is the family's
    `decoder()`, kept as `stage.decoder` (the keys of every checkpoint); any other is the registry's head,
    `stage.head`."""
    if head.reconstructs:
        stage.decoder = decoder()
    else:
        stage.head = head.make(cfg, dim, index)
