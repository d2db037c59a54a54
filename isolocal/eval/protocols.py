"""Evaluate an encoder with the protocols of `isolocal eval`: k-NN, per-stage linear probes, the
model's own classify heads, fine-tuning; every selection on the validation split, test read once.

For the feature protocols, the training part's and the validation split's features are extracted
first; k-NN scores every stage on validation, each linear probe keeps its best validation epoch, and
the stage with the best validation top-1 (the shallowest among equals) is the *selected* stage of each.
Only then are the test features extracted and every stage's kept probe, its k-NN and the classify
heads scored on them, in one read of the test split. Fine-tuning keeps its best validation epoch and
tests that classifier once.
"""
from __future__ import annotations

import dataclasses

from isolocal.config import EvalConfig, RunConfig, to_dict
from isolocal.config.schema import EVAL_MODES
from isolocal.core.device import resolve_device
from isolocal.eval.features import split_features
from isolocal.eval.finetune import classifier_accuracy, finetune
from isolocal.eval.head_accuracy import classify_stages, head_accuracy
from isolocal.eval.knn import check_knn, knn_per_stage
from isolocal.eval.linear import check_optimizer, linear_per_stage, probe_top1
from isolocal.eval.splits import EvalSplits, eval_splits
from isolocal.io.load import load_model
from isolocal.models.encoder import FAMILIES
from isolocal.models.family import check_feature
from isolocal.models.pixels import PixelEncoder


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


def select_stage(val_top1: list[float]) -> int:
    """The stage with the best validation top-1; the shallowest among equals."""
    return max(range(len(val_top1)), key=lambda k: (val_top1[k], -k))


def check_evaluation(modes: list[str], cfg: RunConfig) -> None:
    """What `evaluate(modes, cfg, ...)` would refuse for `cfg`'s own model, found without a model or a
    feature: modes, optimizer, pooling, `eval.train_subset` / `test_subset` and `eval.knn_k` against the
    data (a study checks every run with it before the first one starts)."""
    _check_modes(modes, cfg.eval)
    splits = eval_splits(cfg, cfg.model)
    _check_features(modes, cfg.eval, FAMILIES[cfg.model.arch].has_cls, len(splits.train))


def evaluate(modes: list[str], cfg: RunConfig, ckpt: str, progress: bool = True, read_test: bool = True) -> dict:
    """Run the protocols on `cfg`'s data with the model of `ckpt` (any isolocal checkpoint or run
    directory, a published LocalMIM checkpoint of `cfg`'s model, 'random': the config's model at its
    seeded init, or 'pixels': the images themselves); returns {"results": rows, "selected": ..., ...}
    with the settings used. `read_test=False` stops after the validation numbers (for tuning)."""
    e, workers, finetuning = cfg.eval, cfg.data.num_workers, modes == ["finetune"]
    _check_modes(modes, e)
    model = load_model(ckpt, cfg).to(resolve_device(cfg.train.device))
    if isinstance(model, PixelEncoder):
        if {"head", "finetune"} & set(modes):
            raise ValueError(f"'pixels' has no encoder to fine-tune and no classify heads; eval modes {modes} "
                             "need a model: use knn and/or linear")
        e = dataclasses.replace(e, feature="mean")  # one token per image: pooling does not apply
    if "head" in modes and not classify_stages(model):
        raise ValueError(f"eval head reads the model's own classify heads, and the model of {ckpt} has none (its "
                         f"stages' objectives: {', '.join(model.objectives)}); use knn or linear, or a model "
                         "trained with a head that predicts classes ('classify', 'dgl', 'infopro' with task 'ce', "
                         "'auglocal', 'man') on some stage")
    splits = eval_splits(cfg, model.cfg, augment_train=finetuning)
    _check_features(modes, e, model.family.has_cls, len(splits.train))
    if finetuning:
        rows, extra = _finetune_rows(model, splits, e, cfg.train.seed, workers, progress, read_test)
    else:
        rows, extra = _probe_rows(model, modes, splits, e, cfg.train.seed, workers, progress, read_test)
    return {"modes": modes, "ckpt": ckpt, "model": to_dict(model.cfg), "data": cfg.data.name, **splits.sizes,
            "eval": to_dict(e), "results": rows, **extra, "reads": splits.reads}


def _finetune_rows(model, splits: EvalSplits, e: EvalConfig, seed: int, workers: int, progress: bool,
                   read_test: bool) -> tuple[list[dict], dict]:
    out = finetune(model, splits.train, splits.val(), e, seed, workers, progress)
    row = {"stages": f"0-{model.num_stages - 1}", "finetune_val": out.val_top1, "finetune_epoch": out.epoch}
    if read_test:
        row["finetune_top1"] = classifier_accuracy(out.classifier, splits.test(), e.linear_batch_size, workers,
                                                   progress)
    return [row], {"selected": {"finetune_epoch": out.epoch}, "epochs": out.epochs}


def _probe_rows(model, modes: list[str], splits: EvalSplits, e: EvalConfig, seed: int, workers: int,
                progress: bool, read_test: bool) -> tuple[list[dict], dict]:
    """Per-stage rows and {"selected": stage per protocol}: validation numbers and selections first, then
    (with `read_test`) one read of the test split."""
    rows = [{"stage": k, "tap": tap.index, "dim": tap.dim} for k, tap in enumerate(model.taps)]
    selected: dict[str, int] = {}
    probes = []
    if {"knn", "linear"} & set(modes):
        train = split_features(model, splits.train, e, workers, progress, "train features")
        val = split_features(model, splits.val(), e, workers, progress, "val features")
        if "knn" in modes:
            for row, acc in zip(rows, knn_per_stage(train, val, e)):
                row["knn_val"] = acc
            selected["knn"] = select_stage([row["knn_val"] for row in rows])
        if "linear" in modes:
            probes = linear_per_stage(train, val, e, seed, progress)
            for row, fitted in zip(rows, probes):
                row["linear_val"], row["linear_epoch"] = fitted.val_top1, fitted.epoch
            selected["linear"] = select_stage([row["linear_val"] for row in rows])
    if "head" in modes:
        for k, acc in head_accuracy(model, splits.val(), e.linear_batch_size, workers, progress).items():
            rows[k]["head_val"] = acc
    if not read_test:
        return rows, {"selected": selected}
    test_ds = splits.test()
    if "head" in modes:  # stages without a classify head get no head_top1
        for k, acc in head_accuracy(model, test_ds, e.linear_batch_size, workers, progress).items():
            rows[k]["head_top1"] = acc
    if {"knn", "linear"} & set(modes):
        test = split_features(model, test_ds, e, workers, progress, "test features")
        if "knn" in modes:
            for row, acc in zip(rows, knn_per_stage(train, test, e)):
                row["knn_top1"] = acc
        for row, fitted, x in zip(rows, probes, test.stages):
            row["linear_top1"] = probe_top1(fitted.probe, x, test.labels)
    return rows, {"selected": selected}
