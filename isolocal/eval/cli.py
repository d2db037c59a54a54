"""`isolocal eval knn|linear|finetune -c run.toml --ckpt PATH|random [--set k=v] [--out results.json]`.

`eval knn linear` runs both on features extracted once. Prints one table row per stage (k-NN,
linear) or one for the whole encoder (fine-tuning) and writes the same numbers, with the model and
eval settings that produced them, as JSON. `--ckpt random` evaluates the config's model at its
seeded random init: the baseline every number is judged against.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from isolocal.config import RunConfig
    from isolocal.models.mim import LocalMIM

MODES = ("knn", "linear", "finetune")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="evaluate an encoder: k-NN, per-stage linear probes, fine-tuning",
                              description=__doc__.splitlines()[0])
    p.add_argument("modes", nargs="+", choices=MODES, metavar="{knn,linear,finetune}",
                   help="knn and/or linear (sharing one feature extraction), or finetune")
    p.add_argument("-c", "--config", default=None, help="run config TOML (data and [eval] settings)")
    p.add_argument("--ckpt", required=True, help="isolocal checkpoint, or 'random' for the config's model at init")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set eval.train_subset=10000 eval.feature=mean")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import pandas as pd

    from isolocal.config import load_run_config

    cfg = load_run_config(args.config, args.overrides)
    result = evaluate(args.modes, cfg, args.ckpt)
    print(pd.DataFrame(result["results"]).to_string(index=False, float_format="{:.2f}".format))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def load_model(ckpt: str, cfg: RunConfig) -> LocalMIM:
    """The checkpoint's model, or with 'random' the config's model at its seeded init."""
    import torch

    import isolocal

    if ckpt == "random":
        torch.manual_seed(cfg.train.seed)
        return isolocal.model_from_config(cfg.model)
    if not Path(ckpt).is_file():
        raise FileNotFoundError(f"checkpoint {ckpt} does not exist; pass a checkpoint file or 'random'")
    return isolocal.load_checkpoint(ckpt)


def evaluate(modes: list[str], cfg: RunConfig, ckpt: str, progress: bool = True) -> dict:
    """Run the protocols on `cfg`'s data; returns {"results": rows, ...} with the settings used."""
    from isolocal.config import to_dict
    from isolocal.eval.features import check_feature, eval_datasets, split_features
    from isolocal.eval.finetune import finetune
    from isolocal.eval.knn import check_knn, knn_per_stage
    from isolocal.eval.linear import check_optimizer, linear_per_stage
    from isolocal.train.trainer import resolve_device

    bad = [m for m in modes if m not in MODES]
    if bad or not modes or "finetune" in modes and len(modes) > 1:
        raise ValueError(f"eval modes must be knn and/or linear, or finetune alone; got {modes}")
    e, workers, finetuning = cfg.eval, cfg.data.num_workers, modes == ["finetune"]
    if "linear" in modes:
        check_optimizer(e.linear_optimizer)
    model = load_model(ckpt, cfg).to(resolve_device(cfg.train.device))
    train_ds, test_ds = eval_datasets(cfg, model.cfg, augment_train=finetuning)
    extra: dict = {}
    if finetuning:
        out = finetune(model, train_ds, test_ds, e, cfg.train.seed, workers, progress)
        rows = [{"stages": f"0-{model.num_stages - 1}", "finetune_top1": out["top1"]}]
        extra["epochs"] = out["epochs"]
    else:
        check_feature(e.feature, model.family.has_cls)
        if "knn" in modes:
            check_knn(e, len(train_ds))
        feats = split_features(model, train_ds, test_ds, e, workers, progress)
        rows = [{"stage": k, "tap": tap.index, "dim": tap.dim} for k, tap in enumerate(model.taps)]
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
