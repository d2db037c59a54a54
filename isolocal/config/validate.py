"""Range checks that types cannot express, all before any work, one function per config section.

Every error is a ConfigError naming the key, its value and what would be valid. The model's family
geometry (taps, grids, mask units) is checked by `StagewiseEncoder.check_config`, which knows the families.
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any

from isolocal.config.head_options import check_head_options, option_key
from isolocal.config.schedule import check_schedule_value
from isolocal.config.schema import (
    FAMILY_FIELDS,
    DataConfig,
    EvalConfig,
    ModelConfig,
    PipelineConfig,
    RunConfig,
    TrainConfig,
)
from isolocal.errors import ConfigError

_MODEL_DEFAULTS = ModelConfig()


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _at_least(section: str, cfg: Any, bound: int, names: Sequence[str], note: str = "") -> None:
    """`section.name >= bound` for each name; `note` explains the bound (e.g. " (0 = off)")."""
    for name in names:
        value = getattr(cfg, name)
        _check(value >= bound, f"{section}.{name} must be >= {bound}{note}, got {value}")


def _positive(section: str, cfg: Any, names: Sequence[str]) -> None:
    for name in names:
        value = getattr(cfg, name)
        _check(value > 0, f"{section}.{name} must be > 0, got {value}")


def _one_of(section: str, cfg: Any, name: str, options: Sequence[str]) -> None:
    value = getattr(cfg, name)
    valid = " or ".join(options) + "," if len(options) == 2 else "one of " + ", ".join(options) + ";"
    _check(value in options, f"{section}.{name} must be {valid} got {value!r}")


def _lookup(cfg: Any, key: str | None) -> Any:
    """The value at a dotted key with optional [i] indices, e.g. 'train.betas[1]'."""
    value = cfg
    for part in re.findall(r"[^.\[\]]+", key or ""):
        if isinstance(value, dict):
            value = value[part]
        else:
            value = value[int(part)] if part.isdigit() else getattr(value, part)
    return value


def _non_finite(value: Any, key: str) -> str | None:
    """The key of the first NaN or infinite float in a config value (dataclass, list or float)."""
    if dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            found = _non_finite(getattr(value, f.name), f"{key}.{f.name}" if key else f.name)
            if found:
                return found
    elif isinstance(value, dict):
        for name, item in value.items():
            found = _non_finite(item, f"{key}.{name}")
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


def validate_model(m: ModelConfig) -> None:
    """Ranges of the model's fields, the options of the heads registered so far, and no field set that its
    family ignores."""
    _one_of("model", m, "arch", sorted(FAMILY_FIELDS))
    _at_least("model", m, 1, ("img_size", "in_chans", "patch_size", "embed_dim", "depth", "num_heads",
                              "window_size", "hog_nbins"))
    _at_least("model", m, 0, ("decoder_depth",))
    _positive("model", m, ("mlp_ratio", "decoder_mlp_ratio"))
    _check(0 <= m.drop_path_rate < 1, f"model.drop_path_rate must be in [0, 1), got {m.drop_path_rate}")
    _check(0 < m.mask_ratio < 1, f"model.mask_ratio must be in (0, 1), got {m.mask_ratio}")
    _at_least("model", m, 1, ("mask_unit",))
    _check(0 < m.swin_norm_eps < 1, f"model.swin_norm_eps must be in (0, 1), got {m.swin_norm_eps}")
    _one_of("model", m, "target", ("hog", "pixels"))
    _one_of("model", m, "block", ("basic", "bottleneck"))
    _one_of("model", m, "stem", ("imagenet", "cifar"))
    for name in ("depths", "stage_heads", "channels", "decoder_dim", "decoder_heads"):
        _check(all(v >= 1 for v in getattr(m, name)), f"model.{name} entries must be >= 1, got {getattr(m, name)}")
    _check(bool(m.decoder_dim) and bool(m.decoder_heads),
           f"model.decoder_dim and model.decoder_heads need at least one value, got {m.decoder_dim}, "
           f"{m.decoder_heads}")
    _check(all(v > 0 for v in m.scales), f"model.scales entries must be > 0, got {m.scales}")
    check_head_options(m)
    _family_fields(m)


def _family_fields(m: ModelConfig) -> None:
    """A field the family does not read must keep its default: a set value would silently do nothing."""
    reads = FAMILY_FIELDS[m.arch]
    for f in dataclasses.fields(m):
        value = getattr(m, f.name)
        _check(f.name in reads or value == getattr(_MODEL_DEFAULTS, f.name),
               f"model.{f.name} = {value!r} has no effect on a {m.arch} model (it reads {', '.join(reads)}); "
               f"remove it or use a family that reads it")


def validate_train(t: TrainConfig, model: ModelConfig | None) -> None:
    """Schedule, optimizer, checkpoints and probes; `model` (None: the preset's) rules out attention probes
    of a ResNet."""
    _at_least("train", t, 1, ("epochs",))
    _at_least("train", t, 0, ("max_steps",))
    _at_least("train", t, 1, ("batch_size", "accum_steps"))
    _check(t.batch_size % t.accum_steps == 0,
           f"train.batch_size ({t.batch_size}) must be divisible by train.accum_steps ({t.accum_steps})")
    _positive("train", t, ("base_lr",))
    _at_least("train", t, 0, ("min_lr", "weight_decay"))
    _check(len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas),
           f"train.betas must be two values in [0, 1), got {t.betas}")
    _at_least("train", t, 0, ("warmup_epochs", "clip_grad"))
    _one_of("train", t, "amp", ("auto", "bf16", "fp16", "off"))
    _one_of("train", t, "device", ("auto", "cpu", "cuda"))
    _at_least("train", t, 1, ("keep_last", "log_every", "ckpt_every_epochs"))
    _at_least("train", t, 0, ("ckpt_every_steps", "ckpt_every_minutes"), note=" (0 = off)")
    _one_of("train", t, "nonfinite", ("stop", "skip"))
    _at_least("train", t, 1, ("nonfinite_max_skips",))
    _check(not (t.compile and t.grad_checkpoint),
           "train.grad_checkpoint = true is not supported with train.compile = true; set one of them to false")
    _at_least("train", t, 0, ("analysis_every",))
    _check(t.analysis_every == 0 or model is None or model.arch != "resnet",
           f"train.analysis_every = {t.analysis_every} measures attention, which a resnet has none of; set it to 0")
    _at_least("train", t, 0, ("knn_every_epochs",))
    _check(all(v > 0 for v in t.stage_lr_scale), f"train.stage_lr_scale entries must be > 0, got {t.stage_lr_scale}")


def validate_data(d: DataConfig) -> None:
    """The dataset name, its root and the sizes."""
    _one_of("data", d, "name", ("fashion_mnist", "folder", "synthetic"))
    _check(d.name != "folder" or bool(d.root), "data.root must name the image folder when data.name = 'folder'")
    _at_least("data", d, 0, ("train_subset", "pad", "num_workers"))
    _at_least("data", d, 1, ("synthetic_size",))
    _check(0 < d.crop_scale_min <= 1, f"data.crop_scale_min must be in (0, 1], got {d.crop_scale_min}")


def validate_pipeline(p: PipelineConfig, t: TrainConfig) -> None:
    """Stages, schedule and partition; a pipeline cannot skip a non-finite step (`t.nonfinite`)."""
    _at_least("pipeline", p, 0, ("stages",))
    _at_least("pipeline", p, 1, ("micro_batches",))
    check_schedule_value(p.schedule, ConfigError)
    _at_least("pipeline", p, 1, ("timeout_s",))
    _one_of("pipeline", p, "partition", ("count", "cost"))
    _check(p.stages == 0 or t.nonfinite == "stop",
           "train.nonfinite = 'skip' is not supported with a pipeline (pipeline.stages > 0); use 'stop'")


def validate_eval(e: EvalConfig) -> None:
    """The k-NN, linear-probe and fine-tuning settings."""
    _one_of("eval", e, "feature", ("cls", "mean"))
    _at_least("eval", e, 1, ("knn_k",))
    _positive("eval", e, ("knn_t",))
    _at_least("eval", e, 2, ("num_classes",))
    _at_least("eval", e, 1, ("linear_epochs", "linear_batch_size", "finetune_epochs", "finetune_batch_size"))
    _positive("eval", e, ("linear_lr", "finetune_lr"))
    _at_least("eval", e, 0, ("warmup_epochs", "finetune_weight_decay", "drop_path", "mixup", "cutmix",
                             "train_subset", "test_subset", "finetune_patience", "val_seed"))
    _check(0 < e.val_fraction < 1, f"eval.val_fraction must be in (0, 1), got {e.val_fraction}")
    _check(0 < e.layer_decay <= 1, f"eval.layer_decay must be in (0, 1], got {e.layer_decay}")
    _check(0 <= e.label_smoothing < 1, f"eval.label_smoothing must be in [0, 1), got {e.label_smoothing}")
    _check(e.mixup + e.cutmix == 0 or e.finetune_batch_size % 2 == 0,
           f"eval.finetune_batch_size must be even with mixup/cutmix, got {e.finetune_batch_size}")


def _as_given(cfg: RunConfig, key: str | None) -> str | None:
    """A head option's key as the config gave it (a former flat key, `option_key`); any other key as is."""
    parts = (key or "").split(".")
    if len(parts) == 4 and parts[:2] == ["model", "head_options"]:
        return option_key(cfg.model, parts[2], parts[3])
    return key


def validate_run(cfg: RunConfig) -> None:
    """Every float finite, then each section in range; the model's section only once it is resolved."""
    bad = _non_finite(cfg, "")
    _check(bad is None, f"{_as_given(cfg, bad)} must be a finite number, got {_lookup(cfg, bad)}")
    if cfg.model is not None:
        validate_model(cfg.model)
    validate_train(cfg.train, cfg.model)
    validate_data(cfg.data)
    validate_pipeline(cfg.pipeline, cfg.train)
    validate_eval(cfg.eval)
