"""Evaluate an encoder with the protocols of `isolocal eval`: k-NN, per-stage linear probes, the
model's own classify heads, fine-tuning."""
from __future__ import annotations

from isolocal.config import EvalConfig, RunConfig, to_dict
from isolocal.config.schema import EVAL_MODES
from isolocal.core.device import resolve_device
from isolocal.eval.features import check_feature, eval_datasets, split_features
from isolocal.eval.finetune import finetune
from isolocal.eval.head_accuracy import classify_stages, head_accuracy
from isolocal.eval.knn import check_knn, knn_per_stage
from isolocal.eval.linear import check_optimizer, linear_per_stage
from isolocal.io.load import load_model
from isolocal.models.encoder import FAMILIES



def _check_modes(modes: list[str], cfg: EvalConfig) -> None:
    """The modes and the linear probe's optimizer: checked before a model is loaded."""
    bad = [m for m in modes if m not in EVAL_MODES]
    if bad or not modes or "finetune" in modes and len(modes) > 1:
        raise ValueError(f"eval modes must be any of knn, linear, head, or finetune alone; got {modes}")
    if "linear" in modes:
        check_optimizer(cfg.linear_optimizer)


def _check_features(modes: list[str], cfg: EvalConfig, has_cls: bool, train_images: int) -> None:
    """Pooling and k for the feature protocols: checked before any feature is extracted."""
    if modes != ["finetune"]:
        check_feature(cfg.feature, has_cls)
        if "knn" in modes:
            check_knn(cfg, train_images)


def check_evaluation(modes: list[str], cfg: RunConfig) -> None:
    """What `evaluate(modes, cfg, ...)` would refuse for `cfg`'s own model, found without a model or a
    feature: modes, optimizer, pooling, `eval.train_subset` / `test_subset` and `eval.knn_k` against the
    data (a study checks every run with it before the first one starts)."""
    _check_modes(modes, cfg.eval)
    train_ds, _ = eval_datasets(cfg, cfg.model)
    _check_features(modes, cfg.eval, FAMILIES[cfg.model.arch].has_cls, len(train_ds))


def evaluate(modes: list[str], cfg: RunConfig, ckpt: str, progress: bool = True) -> dict:
    """Run the protocols on `cfg`'s data with the model of `ckpt` (any isolocal checkpoint or run
    directory, a published LocalMIM checkpoint of `cfg`'s model, or 'random': the config's model at its
    seeded init); returns {"results": rows, ...} with the settings used."""
    e, workers, finetuning = cfg.eval, cfg.data.num_workers, modes == ["finetune"]
    _check_modes(modes, e)
    model = load_model(ckpt, cfg).to(resolve_device(cfg.train.device))
    if "head" in modes and not classify_stages(model):
        raise ValueError(f"eval head reads the model's own classify heads, and the model of {ckpt} has none (its "
                         f"stages' objectives: {', '.join(model.objectives)}); use knn or linear, or a model "
                         "trained with model.objective = 'classify' on some stage")
    train_ds, test_ds = eval_datasets(cfg, model.cfg, augment_train=finetuning)
    _check_features(modes, e, model.family.has_cls, len(train_ds))
    extra: dict = {}
    if finetuning:
        out = finetune(model, train_ds, test_ds, e, cfg.train.seed, workers, progress)
        rows = [{"stages": f"0-{model.num_stages - 1}", "finetune_top1": out["top1"]}]
        extra["epochs"] = out["epochs"]
    else:
        rows = [{"stage": k, "tap": tap.index, "dim": tap.dim} for k, tap in enumerate(model.taps)]
        if "head" in modes:  # stages without a classify head get no head_top1
            for k, acc in head_accuracy(model, test_ds, e.linear_batch_size, workers, progress).items():
                rows[k]["head_top1"] = acc
        if {"knn", "linear"} & set(modes):
            feats = split_features(model, train_ds, test_ds, e, workers, progress)
        if "knn" in modes:
            for row, acc in zip(rows, knn_per_stage(feats, e)):
                row["knn_top1"] = acc
        if "linear" in modes:
            for row, acc in zip(rows, linear_per_stage(feats, e, cfg.train.seed, progress)):
                row["linear_top1"] = acc
    return {
        "modes": modes,
        "ckpt": ckpt,
        "model": to_dict(model.cfg),
        "data": cfg.data.name,
        "train_images": len(train_ds),
        "test_images": len(test_ds),
        "eval": to_dict(e),
        "results": rows,
        **extra,
    }
