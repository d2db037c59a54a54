"""The study file: variants x seeds of paired runs, the evaluations they get and the claims they test.

A study file has three tables:

- `[study]`: name, out_dir, `seeds`, `evals`, `baseline`, analysis images and query points,
  `parallel`, and `[study.claims.<name>]` tables;
- `[base]`: a run config shared by every variant (its `imports`, the modules of heads of one's own,
  reach every run's process through the run's config);
- `[variants.<name>]`: what a variant changes (boundary, preset, target, ...). `pretrain = false`
  makes a variant a control that is evaluated at its seeded initialisation without pre-training;
  the variant named `random` is that control by default (an empty `[variants.random]` table is the
  base encoder at random init), and the variant named `pixels` is the raw-pixel floor (the same
  k-NN and linear probes on the normalized images, no encoder). These two are the study's floors.

Every variant runs at every seed; runs with the same seed are paired (same initialisation seed,
data order and masks: `train.seed` is the study seed). Runs live in `<out_dir>/runs/<variant>/seed<k>/`.
A study without `seeds` is a one-seed study at `base.train.seed`, and keeps the older layout
`<out_dir>/runs/<variant>/`, so study files and their outputs from before seeds still work.

A claim compares two variants on one metric, `a - b` per seed, and declares how: `direction =
"noninferior"` says a is at most `margin` worse than b (threshold t = -margin, margin > 0: with 0
equal variants could never fail it), `direction = "superior"` says a beats b by more than `margin`
(t = +margin, margin >= 0). Both are required. Its verdict is "holds" when the lower 95% bound of the
mean difference is above t, "fails" when the upper bound is below t, "undecided" otherwise: the
one-sided t-test of H0: d <= t at 0.025 (see `isolocal.study.stats`), Holm-corrected over the study's
claims in the report. For a metric where lower is better (losses, time, memory) swap `a` and `b`.
A claim on an accuracy (`FLOOR_METRIC`) needs both floor variants, `random` and `pixels`, in the
study: it says something only when both sides clear both (`isolocal.study.claims`).
"""
from __future__ import annotations

import copy
import json
import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from isolocal.config import ConfigError, RunConfig, apply_overrides, from_dict, to_dict, validate_run
from isolocal.config.imports import load_imports, resolve_imports
from isolocal.config.presets import resolve_model_config
from isolocal.io.load import PIXELS, RANDOM
from isolocal.models.encoder import StagewiseEncoder

# The built-in controls, named as the sources `load_model` knows: "random" (the encoder at its seeded
# init, no pre-training) and "pixels" (the probes on raw, normalized pixels, no encoder).
FLOORS = (RANDOM, PIXELS)  # the controls every accuracy claim must clear
DIRECTIONS = ("noninferior", "superior")
EVALS = ("knn", "linear", "head", "finetune")
_NAME = re.compile(r"[A-Za-z0-9_.-]+")

# Metric families of a run, as they appear in summary.csv: name -> (where, what it needs).
# where: "stage" (one value per stage, also addressed by the stage's tap layer), "layer" (one value
# per encoder layer), "run" (one value). Accuracies are on the test split unless named `*_val`
# (the validation split carved out of the labelled training images); `*_sel` is the test accuracy
# of the stage chosen on validation, `*_sel_stage` that stage, `*_top` the last stage's (matched depth).
# Besides these, every log a head returns (`HeadOutput.logs`) is a metric `log_<key>` (`HEAD_LOG`,
# `metric_info`): per stage, at the last logged training step.
METRICS: dict[str, tuple[str, str]] = {
    "loss": ("stage", "pretrain"),
    "loss_total": ("run", "pretrain"),
    "knn": ("stage", "knn"),
    "knn_val": ("stage", "knn"),
    "knn_sel": ("run", "knn"),
    "knn_sel_stage": ("run", "knn"),
    "knn_top": ("run", "knn"),
    "linear": ("stage", "linear"),
    "linear_val": ("stage", "linear"),
    "linear_sel": ("run", "linear"),
    "linear_sel_stage": ("run", "linear"),
    "linear_top": ("run", "linear"),
    "head": ("stage", "head"),  # a classify head's own top-1 (stages with one)
    "head_val": ("stage", "head"),
    "head_top": ("run", "head"),  # the top stage's classify head: the model's prediction
    "finetune": ("run", "finetune"),  # at the epoch chosen on validation
    "finetune_val": ("run", "finetune"),
    "nmi": ("layer", "analysis"),
    "attention_distance": ("layer", "analysis"),
    "pretrain_s": ("run", "pretrain"),
    "epoch_s": ("run", "pretrain"),
    "img_per_s": ("run", "pretrain"),
    "peak_mem_mb": ("run", "pretrain"),
}
HEAD_LOG = re.compile(r"log_[A-Za-z0-9_]+")  # a head's log `<key>` as a metric: `log_<key>`, per stage


def metric_info(metric: str) -> tuple[str, str] | None:
    """(where, what it needs) of a summary metric (see `METRICS`), None for a name that is not one."""
    if metric in METRICS:
        return METRICS[metric]
    return ("stage", "pretrain") if HEAD_LOG.fullmatch(metric) else None


# Accuracy metrics a floor applies to -> the floor variant's metric it must beat: a k-NN number the
# floor's k-NN, a trained classifier (probe, head, fine-tuned encoder) a linear probe on the floor's
# features; both floors' numbers are their validation-selected stage's on test.
FLOOR_METRIC: dict[str, str] = {
    "knn": "knn_sel", "knn_sel": "knn_sel", "knn_top": "knn_sel",
    "linear": "linear_sel", "linear_sel": "linear_sel", "linear_top": "linear_sel",
    "head": "linear_sel", "head_top": "linear_sel", "finetune": "linear_sel",
}


@dataclass
class Claim:
    """`a - b` on `metric` (at `stage` or `layer`, a list meaning their mean) must exceed `threshold`:
    -margin for a non-inferiority claim, +margin for a superiority claim."""

    a: str
    b: str
    metric: str
    margin: float
    direction: str  # "noninferior" | "superior"
    stage: int | list[int] | None = None  # per-stage metrics: stage index (or indices, averaged)
    layer: int | list[int] | None = None  # per-stage or per-layer metrics: 1-based encoder layer(s)
    statement: str = ""  # what the claim says, shown in the report

    @property
    def threshold(self) -> float:
        return -self.margin if self.direction == "noninferior" else self.margin


@dataclass
class Study:
    name: str
    out_dir: str
    variants: dict[str, dict]  # name -> the variant's full run-config dict (base merged with its table)
    pretrain: dict[str, bool]  # name -> False for controls evaluated at init
    seeds: list[int] | None = None  # None: a one-seed study at base.train.seed (older layout)
    evals: list[str] = field(default_factory=lambda: ["knn", "linear"])
    baseline: str = ""  # paired differences and time to accuracy are against it; "" = the first variant
    claims: dict[str, Claim] = field(default_factory=dict)
    nmi_layers: list[int] = field(default_factory=lambda: [2, 3, 4])  # layers in the paired-difference table
    images: str = "fmnist:0,1,2,3,4,5,6,7"
    query: list[list[int]] = field(default_factory=lambda: [[4, 4], [1, 6]])
    attention_image: int = 0
    parallel: int = 0  # runs at a time; 0: one per core, each with an even share of the threads

    @property
    def root(self) -> Path:
        return Path(self.out_dir)

    @property
    def seeded(self) -> bool:
        return self.seeds is not None

    def runs(self) -> list[Run]:
        """Every run, seed-major: all variants at the first seed first, so a partial study has pairs."""
        if self.seeds is None:
            return [Run(v, resolve_run(self, v).train.seed, self.root / "runs" / v) for v in self.variants]
        return [Run(v, s, self.root / "runs" / v / f"seed{s}") for s in self.seeds for v in self.variants]


@dataclass(frozen=True)
class Run:
    variant: str
    seed: int
    dir: Path

    @property
    def label(self) -> str:
        return f"{self.variant} seed {self.seed}"


def _merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _resolve_file_imports(data: dict, folder: Path) -> None:
    """Make the `imports` of [base] and of each variant absolute against the study file's `folder`, in place."""
    tables = [("base", data.get("base"))] + [(f"variants.{name}", table)
                                             for name, table in (data.get("variants") or {}).items()]
    for where, table in tables:
        if isinstance(table, dict) and "imports" in table:
            table["imports"] = resolve_imports(table["imports"], folder, f"{where}.imports")


def load_study(path: str | Path, overrides: list[str] | None = None, imports: Sequence[str] = ()) -> Study:
    """Read and validate a study file; every run's config and every claim is checked here, before any work.
    Each variant's `imports` (its own, else [base]'s; relative files against the study file's directory) and
    `imports` (`--import`: against the working directory) are imported first and go into its runs' configs."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study file {path} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"study file {path} is not valid TOML: {err}") from None
    _resolve_file_imports(data, path.resolve().parent)
    data = apply_overrides(data, overrides or [])
    extra = resolve_imports(list(imports), Path.cwd(), "--import")
    unknown = sorted(set(data) - {"study", "base", "variants"})
    if unknown:
        raise ConfigError(f"unknown study table {unknown[0]}; valid tables: study, base, variants")
    options = dict(data.get("study", {}))
    tables = data.get("variants", {})
    if not tables:
        raise ConfigError(f"study file {path} defines no [variants.<name>] tables")
    base = data.get("base", {})
    seeds = options.get("seeds")
    if seeds is not None and "seed" in base.get("train", {}):
        raise ConfigError("base.train.seed conflicts with study.seeds (the study sets each run's seed); remove it")
    variants, pretrain = {}, {}
    for name, table in tables.items():
        if not _NAME.fullmatch(name):
            raise ConfigError(f"variant name {name!r} may hold only letters, digits, '_', '.' and '-'")
        table = dict(table)
        pretrain[name] = table.pop("pretrain", name not in FLOORS)
        if not isinstance(pretrain[name], bool):
            raise ConfigError(f"variants.{name}.pretrain: {pretrain[name]!r} must be true or false")
        if name == PIXELS and pretrain[name]:
            raise ConfigError(f"variants.{PIXELS} is the raw-pixel floor and has no encoder to pre-train; remove "
                              "its pretrain = true, or give the variant another name")
        if seeds is not None and "seed" in table.get("train", {}):
            raise ConfigError(f"variants.{name}.train.seed conflicts with study.seeds; remove it")
        variants[name] = _merge(base, table)
        own = resolve_imports(variants[name].get("imports", []), Path.cwd(), f"variants.{name}.imports")
        variants[name]["imports"] = load_imports([*own, *extra])
    options.setdefault("name", path.stem)
    options.setdefault("out_dir", f"reports/{options['name']}")
    claims = options.pop("claims", {})
    if not isinstance(claims, dict):
        raise ConfigError("study.claims must be a table of [study.claims.<name>] tables")
    study = from_dict(Study, {**options, "variants": variants, "pretrain": pretrain}, prefix="study.")
    study.claims = {n: read_claim(n, c) for n, c in claims.items()}
    _validate(study)
    for variant in study.variants:
        resolve_run(study, variant)  # raises on a bad variant before anything runs
    return study


def _validate(study: Study) -> None:
    bad = [e for e in study.evals if e not in EVALS]
    if bad or len(set(study.evals)) != len(study.evals):
        raise ConfigError(f"study.evals may hold each of {', '.join(EVALS)} once, got {study.evals}")
    if study.parallel < 0:
        raise ConfigError(f"study.parallel must be >= 0 (0: one run per core), got {study.parallel}")
    if study.seeds is not None and (not study.seeds or len(set(study.seeds)) != len(study.seeds)
                                    or min(study.seeds) < 0):
        raise ConfigError(f"study.seeds must be distinct integers >= 0, got {study.seeds}")
    names = list(study.variants)
    study.baseline = study.baseline or names[0]
    if study.baseline not in study.variants:
        raise ConfigError(f"study.baseline {study.baseline!r} is not a variant; variants: {', '.join(names)}")
    for name, claim in study.claims.items():
        check_claim(name, claim, study)


_REQUIRED = {
    "a": 'a = "<variant>"', "b": 'b = "<variant>"', "metric": 'metric = "<metric>"',
    "margin": "margin = 1.0 (non-inferior: a at most 1 worse than b; superior: a better by more than it, 0 allowed)",
    "direction": 'direction = "noninferior" (a at most margin worse than b) or "superior" (a beats b by more than margin)',
}


def read_claim(name: str, table: Any) -> Claim:
    """One `[study.claims.<name>]` table; what it must say is named when it is missing."""
    where = f"study.claims.{name}"
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table ([{where}])")
    for key, example in _REQUIRED.items():
        if key not in table:
            raise ConfigError(f"{where} has no {key}; add {example}")
    return from_dict(Claim, table, prefix=f"{where}.")


def check_claim(name: str, claim: Claim, study: Study) -> None:
    """A claim must name two variants, a metric the study measures, where to read it, a direction
    and a margin that can fail, and, on an accuracy, the floors it is checked against."""
    where = f"study.claims.{name}"
    if claim.direction not in DIRECTIONS:
        raise ConfigError(f"{where}.direction {claim.direction!r} is unknown; use \"noninferior\" (a at most "
                          f"margin worse than b) or \"superior\" (a beats b by more than margin)")
    if claim.direction == "noninferior" and not claim.margin > 0:
        raise ConfigError(f"{where}.margin = {claim.margin} must be > 0 for a non-inferiority claim (with 0 it "
                          f"cannot fail when a equals b); to claim a is better, use direction = \"superior\"")
    if claim.direction == "superior" and not claim.margin >= 0:
        raise ConfigError(f"{where}.margin = {claim.margin} must be >= 0 for a superiority claim (a beats b "
                          f"by more than margin)")
    for side in ("a", "b"):
        if getattr(claim, side) not in study.variants:
            raise ConfigError(f"{where}.{side} = {getattr(claim, side)!r} is not a variant; "
                              f"variants: {', '.join(study.variants)}")
    if claim.a == claim.b:
        raise ConfigError(f"{where}: a and b are both {claim.a!r}; a claim compares two variants")
    if metric_info(claim.metric) is None:
        raise ConfigError(f"{where}.metric {claim.metric!r} is unknown; metrics: {', '.join(METRICS)}, and "
                          "log_<key> for a head's log <key>")
    kind, needs = metric_info(claim.metric)
    if needs in EVALS and needs not in study.evals:
        raise ConfigError(f"{where}.metric {claim.metric!r} needs {needs!r} in study.evals ({study.evals})")
    if needs == "pretrain" and not (study.pretrain[claim.a] and study.pretrain[claim.b]):
        raise ConfigError(f"{where}.metric {claim.metric!r} is a pre-training number; "
                          f"variant {claim.a if not study.pretrain[claim.a] else claim.b} is not pre-trained")
    if kind == "run" and (claim.stage is not None or claim.layer is not None):
        raise ConfigError(f"{where}: metric {claim.metric!r} has one value per run; remove stage/layer")
    if kind == "stage" and (claim.stage is None) == (claim.layer is None):
        per_run = [m for m, (k, _) in METRICS.items() if k == "run" and m.startswith(f"{claim.metric}_")
                   and not m.endswith("_stage")]
        raise ConfigError(f"{where}: metric {claim.metric!r} has one value per stage; set either stage "
                          f"(index) or layer (tap layer)" + (f", or use {' / '.join(per_run)}" if per_run else ""))
    if kind == "layer" and (claim.layer is None or claim.stage is not None):
        raise ConfigError(f"{where}: metric {claim.metric!r} has one value per layer; set layer (1-based)")
    if claim.metric in FLOOR_METRIC:
        check_floors(where, claim, study)
    asked = claim.stage if claim.stage is not None else claim.layer
    if asked is None:
        return
    listed = asked if isinstance(asked, list) else [asked]
    for variant in (claim.a, claim.b):
        model = resolve_run(study, variant).model
        if claim.stage is not None:
            what, valid = "stage", list(range(len(model.taps)))
        elif kind == "stage":
            what, valid = "tap layer", [t + 1 for t in model.taps]
        else:
            what, valid = "layer", list(range(1, (sum(model.depths) if model.arch == "swin" else model.depth) + 1))
        if not listed or not set(listed) <= set(valid):
            raise ConfigError(f"{where}: {what} {asked} is not among variant {variant}'s {what}s {valid}")


def check_floors(where: str, claim: Claim, study: Study) -> None:
    """An accuracy claim is read against both floors, so the study must run them and measure their metric."""
    missing = [f for f in FLOORS if f not in study.variants]
    if missing:
        raise ConfigError(f"{where}: metric {claim.metric!r} is an accuracy, which must clear the floors "
                          f"{' and '.join(FLOORS)}; add {' and '.join(f'[variants.{f}]' for f in missing)} "
                          f"to the study")
    floor_metric = FLOOR_METRIC[claim.metric]
    needs = METRICS[floor_metric][1]
    if needs not in study.evals:
        raise ConfigError(f"{where}: metric {claim.metric!r} is checked against the floors' {floor_metric}, "
                          f"which needs {needs!r} in study.evals ({study.evals})")


def resolve_run(study: Study, variant: str, seed: int | None = None) -> RunConfig:
    """A run's RunConfig: the variant's config at `seed` (the study's first seed when None), in its run dir."""
    data = copy.deepcopy(study.variants[variant])
    if study.seeds is not None:
        seed = study.seeds[0] if seed is None else seed
        data.setdefault("train", {})["seed"] = seed
        data["out_dir"] = str(study.root / "runs" / variant / f"seed{seed}")
    else:
        data["out_dir"] = str(study.root / "runs" / variant)
    try:
        cfg = from_dict(RunConfig, {k: v for k, v in data.items() if k != "model"})
        cfg.model = resolve_model_config(cfg.preset, data.get("model", {}))
        StagewiseEncoder.check_config(cfg.model)  # geometry, without allocating weights
        validate_run(cfg)
    except ValueError as err:
        raise ConfigError(f"variant {variant}: {err}") from None
    return cfg


def run_spec(study: Study, run: Run) -> dict[str, Any]:
    """Everything a run's own process needs (written to `<run>/run.json`); also what makes a run stale."""
    cfg = resolve_run(study, run.variant, run.seed if study.seeded else None)
    return json.loads(json.dumps({
        "variant": run.variant, "seed": run.seed, "pretrain": study.pretrain[run.variant],
        "evals": study.evals, "images": study.images, "query": study.query,
        "attention_image": study.attention_image, "config": to_dict(cfg),
    }))


def select_runs(study: Study, only: list[str]) -> list[Run]:
    """The runs `--only variant[:seed]` names (all runs when `only` is empty), in study order."""
    runs = study.runs()
    if not only:
        return runs
    wanted: set[tuple[str, int | None]] = set()
    for item in only:
        variant, _, seed = item.partition(":")
        if variant not in study.variants:
            raise ConfigError(f"--only {item}: no variant {variant!r}; variants: {', '.join(study.variants)}")
        seeds = sorted({r.seed for r in runs if r.variant == variant})
        if seed and (not seed.isdigit() or int(seed) not in seeds):
            raise ConfigError(f"--only {item}: seed {seed!r} is not one of this variant's seeds {seeds}")
        wanted.add((variant, int(seed) if seed else None))
    return [r for r in runs if (r.variant, None) in wanted or (r.variant, r.seed) in wanted]
