"""Every knob as a dataclass; TOML files plus `--set a.b=c` overrides; strict validation.

Configs are plain dataclasses so a run's resolved config can be written next to its logs and read
back unchanged. This module knows no model: presets are resolved by `isolocal.config.load`. Loading is strict on purpose: an unknown key or a wrong type is an error that
names the key, because a typo that silently falls back to a default wastes a whole run.
"""
from __future__ import annotations

import dataclasses
import math
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from isolocal.config.schedule import check_schedule_value

Boundary = Union[str, float, list]
Objective = Union[str, list]


class ConfigError(ValueError):
    """A config value is invalid; the message names the key and what would be valid."""


@dataclass
class ModelConfig:
    """One model family ("vit", "swin" or "resnet") with its taps, scales, targets and decoders."""

    arch: str = "vit"
    img_size: int = 224
    in_chans: int = 3
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0
    # Swin and ResNet: blocks per stage (Swin stage / timm ResNet `layerN`); Swin only: heads and window (tokens).
    depths: list[int] = field(default_factory=list)
    stage_heads: list[int] = field(default_factory=list)
    window_size: int = 7
    # ResNet only: residual block, output width of each timm stage (before a bottleneck's x4), stem.
    block: str = "basic"  # "basic" | "bottleneck" (timm's BasicBlock / Bottleneck)
    channels: list[int] = field(default_factory=lambda: [64, 128, 256, 512])
    stem: str = "imagenet"  # "imagenet" (timm's 7x7/2 conv + 3x3/2 max pool) | "cifar" (3x3/1 conv, no pool)
    # Local heads: 0-based block index of each tap and the output scale of its decoder.
    taps: list[int] = field(default_factory=lambda: [1, 3, 9, 11])
    scales: list[float] = field(default_factory=lambda: [4.0, 2.0, 1.0, 0.5])
    target: str = "hog"  # "hog" | "pixels"
    hog_nbins: int = 9
    hog_bias: bool = False
    hog_bias_seed: int = 0
    decoder_dim: list[int] = field(default_factory=lambda: [256])  # one value or one per tap
    decoder_depth: int = 1
    decoder_heads: list[int] = field(default_factory=lambda: [8])  # one value or one per tap
    decoder_mlp_ratio: float = 4.0
    # Masking: ratio of masked tokens, mask-unit side in patches, one mask per batch or per image.
    mask_ratio: float = 0.75
    mask_unit: int = 1
    mask_per_batch: bool = False
    # "global", "isolated", an alpha in [0, 1], or a list with one entry per boundary.
    boundary: Boundary = "global"
    # Dense (SimMIM-style) encoders keep mask tokens inside the encoder (Swin only).
    dense_encoder: bool = False
    # Local objective of each stage (isolocal.heads): "mim" | "classify" | "contrastive", or one per stage.
    objective: Objective = "mim"
    num_classes: int = 10  # classify heads
    head_hidden: int = 0  # hidden width of the classify / contrastive MLP; 0 = the stage's width
    proj_dim: int = 128  # contrastive projection size
    temperature: float = 0.1  # contrastive InfoNCE temperature


@dataclass
class DataConfig:
    name: str = "fashion_mnist"  # "fashion_mnist" | "folder" | "synthetic"
    root: str = ""  # "" -> the dataset's default location
    synthetic_size: int = 512
    num_workers: int = 0
    crop_scale_min: float = 0.2
    train_subset: int = 0  # > 0: pre-train on the first N training images only (quick CPU recipes)
    pad: int = 0  # zero pixels added on every side before the resize/crop (Fashion-MNIST 28 + 2 * 2 = 32 px)


@dataclass
class TrainConfig:
    epochs: int = 1
    max_steps: int = 0  # > 0 stops early (smoke runs, benchmarks)
    batch_size: int = 256  # global batch per optimizer step
    accum_steps: int = 1
    base_lr: float = 2e-4  # lr = base_lr * batch_size / 256
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_epochs: float = 1.0
    clip_grad: float = 0.0  # per stage; 0 disables
    stage_lr_scale: list[float] = field(default_factory=list)  # optional lr multiplier per stage
    per_stage_optimizers: bool = False
    amp: str = "auto"  # "auto" (bf16 on CUDA, off on CPU) | "bf16" | "fp16" | "off"
    seed: int = 0
    log_every: int = 10
    ckpt_every_epochs: int = 1
    ckpt_every_steps: int = 0  # > 0: also save last.pt every N optimizer steps (mid-epoch; resumes exactly)
    ckpt_every_minutes: float = 0.0  # > 0: also save last.pt when this much time passed since the last save
    nonfinite: str = "stop"  # a NaN/inf loss or gradient: "stop" the run, or "skip" that step's update
    nonfinite_max_skips: int = 10  # "skip": stop after this many consecutive skipped steps
    keep_last: int = 2
    analysis_every: int = 0  # > 0: NMI / attention distance on a probe batch every N steps
    knn_every_epochs: int = 0  # > 0: online k-NN every N epochs
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    compile: bool = False  # torch.compile each stage (and its decoder) in place; state-dict keys unchanged
    # Recompute each stage's encoder forward in backward (torch.utils.checkpoint): the end-to-end memory baseline.
    grad_checkpoint: bool = False
    tensorboard: bool = False  # also log every record to TensorBoard (<out_dir>/tensorboard; needs `tensorboard`)


@dataclass
class PipelineConfig:
    stages: int = 0  # pipeline ranks; 0 = no pipeline
    micro_batches: int = 4
    # "auto" (isolated when every boundary is isolated, else 1f1b) | "isolated" | "1f1b" ("default" = "1f1b")
    schedule: str = "auto"
    timeout_s: int = 120
    partition: str = "count"  # stages per rank: "count" (balanced parameter counts) | "cost" (measured time)
    profile: bool = False  # per-rank time breakdown and a Chrome trace in out_dir (pipeline_profile.*)


@dataclass
class EvalConfig:
    feature: str = "cls"  # "cls" | "mean"
    knn_k: int = 20
    knn_t: float = 0.07
    linear_epochs: int = 10
    linear_lr: float = 0.1
    linear_batch_size: int = 256  # also the feature-extraction batch
    linear_optimizer: str = "sgd"  # any timm optimizer name: "sgd" (Nesterov momentum 0.9), "adamw", "lars", ...
    warmup_epochs: float = 1.0  # linear warmup before the cosine decay (linear probe and fine-tuning)
    finetune_epochs: int = 10
    finetune_lr: float = 1e-3
    finetune_batch_size: int = 64
    finetune_weight_decay: float = 0.05
    layer_decay: float = 0.75
    drop_path: float = 0.1
    label_smoothing: float = 0.1
    mixup: float = 0.0
    cutmix: float = 0.0
    num_classes: int = 10
    train_subset: int = 0  # > 0: use only the first N training images
    test_subset: int = 0


@dataclass
class RunConfig:
    """A whole run: which preset, its overrides, the data, the optimizer and where to write."""

    preset: str = "localmim_vit_nano"
    out_dir: str = "runs/default"
    model: ModelConfig | None = None  # None -> the preset's config
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = [o for o in typing.get_args(tp) if o is not type(None)]
        if value is None and len(options) < len(typing.get_args(tp)):
            return None
        if len(options) == 1:  # `X | None`: X's own error names the exact key (e.g. model.depth)
            return _coerce(value, options[0], key)
        for option in options:
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} has the wrong type; expected {tp}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: {value!r} has the wrong type; expected a list")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: {value!r} has the wrong type; expected a table")
        return value
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
    """Build dataclass `cls` from a nested dict; unknown keys and wrong types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]}; valid keys here: {', '.join(sorted(names))}"
        )
    return cls(**{k: _coerce(v, hints[k], prefix + k) for k, v in data.items()})


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


def _lookup(cfg: Any, key: str | None) -> Any:
    """The value at a dotted key with optional [i] indices, e.g. 'train.betas[1]'."""
    value = cfg
    for part in re.findall(r"[^.\[\]]+", key or ""):
        value = value[int(part)] if part.isdigit() else getattr(value, part)
    return value


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _non_finite(value: Any, key: str) -> str | None:
    """The key of the first NaN or infinite float in a config value (dataclass, list or float)."""
    if dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            found = _non_finite(getattr(value, f.name), f"{key}.{f.name}" if key else f.name)
            if found:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _non_finite(item, f"{key}[{i}]")
            if found:
                return found
    elif isinstance(value, float) and not math.isfinite(value):
        return key
    return None


def _validate_model(m: ModelConfig) -> None:
    """Ranges of the model's numeric fields (geometry that needs the family is checked by the model)."""
    for name in ("img_size", "in_chans", "patch_size", "embed_dim", "depth", "num_heads", "window_size",
                 "hog_nbins"):
        _check(getattr(m, name) >= 1, f"model.{name} must be >= 1, got {getattr(m, name)}")
    _check(m.decoder_depth >= 0, f"model.decoder_depth must be >= 0, got {m.decoder_depth}")
    _check(m.mlp_ratio > 0, f"model.mlp_ratio must be > 0, got {m.mlp_ratio}")
    _check(m.decoder_mlp_ratio > 0, f"model.decoder_mlp_ratio must be > 0, got {m.decoder_mlp_ratio}")
    _check(0 <= m.drop_path_rate < 1, f"model.drop_path_rate must be in [0, 1), got {m.drop_path_rate}")
    _check(0 < m.mask_ratio < 1, f"model.mask_ratio must be in (0, 1), got {m.mask_ratio}")
    _check(m.mask_unit >= 1, f"model.mask_unit must be >= 1, got {m.mask_unit}")
    _check(m.target in ("hog", "pixels"), f"model.target must be hog or pixels, got {m.target!r}")
    _check(m.block in ("basic", "bottleneck"), f"model.block must be basic or bottleneck, got {m.block!r}")
    _check(m.stem in ("imagenet", "cifar"), f"model.stem must be imagenet or cifar, got {m.stem!r}")
    for name in ("depths", "stage_heads", "channels", "decoder_dim", "decoder_heads"):
        bad = [v for v in getattr(m, name) if v < 1]
        _check(not bad, f"model.{name} entries must be >= 1, got {getattr(m, name)}")
    _check(bool(m.decoder_dim) and bool(m.decoder_heads),
           f"model.decoder_dim and model.decoder_heads need at least one value, got {m.decoder_dim}, "
           f"{m.decoder_heads}")
    bad_scales = [v for v in m.scales if v <= 0]
    _check(not bad_scales, f"model.scales entries must be > 0, got {m.scales}")
    _check(m.num_classes >= 2, f"model.num_classes must be >= 2, got {m.num_classes}")
    _check(m.head_hidden >= 0, f"model.head_hidden must be >= 0 (0 = the stage's width), got {m.head_hidden}")
    _check(m.proj_dim >= 1, f"model.proj_dim must be >= 1, got {m.proj_dim}")
    _check(m.temperature > 0, f"model.temperature must be > 0, got {m.temperature}")


def validate_run(cfg: RunConfig) -> None:
    """Range checks that types cannot express, all before any work: every float finite, every count
    in range. The model's family geometry (taps, grids, mask units) is checked by `StagewiseEncoder.check_config`."""
    bad = _non_finite(cfg, "")
    _check(bad is None, f"{bad} must be a finite number, got {_lookup(cfg, bad)}")
    if cfg.model is not None:
        _validate_model(cfg.model)
    t = cfg.train
    _check(t.epochs >= 1, f"train.epochs must be >= 1, got {t.epochs}")
    _check(t.max_steps >= 0, f"train.max_steps must be >= 0, got {t.max_steps}")
    _check(t.batch_size >= 1, f"train.batch_size must be >= 1, got {t.batch_size}")
    _check(t.accum_steps >= 1, f"train.accum_steps must be >= 1, got {t.accum_steps}")
    _check(
        t.batch_size % t.accum_steps == 0,
        f"train.batch_size ({t.batch_size}) must be divisible by train.accum_steps ({t.accum_steps})",
    )
    _check(t.base_lr > 0, f"train.base_lr must be > 0, got {t.base_lr}")
    _check(t.min_lr >= 0, f"train.min_lr must be >= 0, got {t.min_lr}")
    _check(t.weight_decay >= 0, f"train.weight_decay must be >= 0, got {t.weight_decay}")
    _check(len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas),
           f"train.betas must be two values in [0, 1), got {t.betas}")
    _check(t.warmup_epochs >= 0, f"train.warmup_epochs must be >= 0, got {t.warmup_epochs}")
    _check(t.clip_grad >= 0, f"train.clip_grad must be >= 0, got {t.clip_grad}")
    _check(t.amp in ("auto", "bf16", "fp16", "off"),
           f"train.amp must be one of auto, bf16, fp16, off; got {t.amp!r}")
    _check(t.device in ("auto", "cpu", "cuda"),
           f"train.device must be one of auto, cpu, cuda; got {t.device!r}")
    _check(t.keep_last >= 1, f"train.keep_last must be >= 1, got {t.keep_last}")
    _check(t.log_every >= 1, f"train.log_every must be >= 1, got {t.log_every}")
    _check(t.ckpt_every_epochs >= 1, f"train.ckpt_every_epochs must be >= 1, got {t.ckpt_every_epochs}")
    _check(t.ckpt_every_steps >= 0, f"train.ckpt_every_steps must be >= 0 (0 = off), got {t.ckpt_every_steps}")
    _check(t.ckpt_every_minutes >= 0,
           f"train.ckpt_every_minutes must be >= 0 (0 = off), got {t.ckpt_every_minutes}")
    _check(t.nonfinite in ("stop", "skip"), f"train.nonfinite must be stop or skip, got {t.nonfinite!r}")
    _check(t.nonfinite_max_skips >= 1, f"train.nonfinite_max_skips must be >= 1, got {t.nonfinite_max_skips}")
    _check(not (t.compile and t.grad_checkpoint),
           "train.grad_checkpoint = true is not supported with train.compile = true; set one of them to false")
    _check(t.analysis_every >= 0, f"train.analysis_every must be >= 0, got {t.analysis_every}")
    _check(t.analysis_every == 0 or cfg.model is None or cfg.model.arch != "resnet",
           f"train.analysis_every = {t.analysis_every} measures attention, which a resnet has none of; set it to 0")
    _check(t.knn_every_epochs >= 0, f"train.knn_every_epochs must be >= 0, got {t.knn_every_epochs}")
    bad_scales = [v for v in t.stage_lr_scale if v <= 0]
    _check(not bad_scales, f"train.stage_lr_scale entries must be > 0, got {t.stage_lr_scale}")
    d = cfg.data
    _check(d.name in ("fashion_mnist", "folder", "synthetic"),
           f"data.name must be one of fashion_mnist, folder, synthetic; got {d.name!r}")
    _check(d.name != "folder" or bool(d.root), "data.root must name the image folder when data.name = 'folder'")
    _check(d.train_subset >= 0, f"data.train_subset must be >= 0, got {d.train_subset}")
    _check(d.pad >= 0, f"data.pad must be >= 0, got {d.pad}")
    _check(d.num_workers >= 0, f"data.num_workers must be >= 0, got {d.num_workers}")
    _check(d.synthetic_size >= 1, f"data.synthetic_size must be >= 1, got {d.synthetic_size}")
    _check(0 < d.crop_scale_min <= 1, f"data.crop_scale_min must be in (0, 1], got {d.crop_scale_min}")
    p = cfg.pipeline
    _check(p.stages >= 0, f"pipeline.stages must be >= 0, got {p.stages}")
    _check(p.micro_batches >= 1, f"pipeline.micro_batches must be >= 1, got {p.micro_batches}")
    check_schedule_value(p.schedule, ConfigError)
    _check(p.timeout_s >= 1, f"pipeline.timeout_s must be >= 1, got {p.timeout_s}")
    _check(p.partition in ("count", "cost"), f"pipeline.partition must be count or cost, got {p.partition!r}")
    _check(p.stages == 0 or t.nonfinite == "stop",
           "train.nonfinite = 'skip' is not supported with a pipeline (pipeline.stages > 0); use 'stop'")
    e = cfg.eval
    _check(e.feature in ("cls", "mean"), f"eval.feature must be cls or mean, got {e.feature!r}")
    _check(e.knn_k >= 1, f"eval.knn_k must be >= 1, got {e.knn_k}")
    _check(e.knn_t > 0, f"eval.knn_t must be > 0, got {e.knn_t}")
    _check(e.num_classes >= 2, f"eval.num_classes must be >= 2, got {e.num_classes}")
    for name in ("linear_epochs", "linear_batch_size", "finetune_epochs", "finetune_batch_size"):
        _check(getattr(e, name) >= 1, f"eval.{name} must be >= 1, got {getattr(e, name)}")
    for name in ("linear_lr", "finetune_lr"):
        _check(getattr(e, name) > 0, f"eval.{name} must be > 0, got {getattr(e, name)}")
    for name in ("warmup_epochs", "finetune_weight_decay", "drop_path", "mixup", "cutmix",
                 "train_subset", "test_subset"):
        _check(getattr(e, name) >= 0, f"eval.{name} must be >= 0, got {getattr(e, name)}")
    _check(0 < e.layer_decay <= 1, f"eval.layer_decay must be in (0, 1], got {e.layer_decay}")
    _check(0 <= e.label_smoothing < 1, f"eval.label_smoothing must be in [0, 1), got {e.label_smoothing}")
    _check(e.mixup + e.cutmix == 0 or e.finetune_batch_size % 2 == 0,
           f"eval.finetune_batch_size must be even with mixup/cutmix, got {e.finetune_batch_size}")
