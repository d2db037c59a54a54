"""`isolocal eval knn|linear|finetune -c run.toml --ckpt PATH|random [--set k=v] [--out results.json]`.

Prints one table row per stage (k-NN, linear) or one for the whole encoder (fine-tuning) and writes
the same numbers, with the model and eval settings that produced them, as JSON. `--ckpt random`
evaluates the config's model at its seeded random init: the baseline every number is judged against.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

MODES = ("knn", "linear", "finetune")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="evaluate an encoder: k-NN, per-stage linear probes, fine-tuning",
                              description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=MODES)
    p.add_argument("-c", "--config", default=None, help="run config TOML (data and [eval] settings)")
    p.add_argument("--ckpt", required=True, help="isolocal checkpoint, or 'random' for the config's model at init")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. eval.train_subset=10000 (repeatable)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import pandas as pd

    from isolocal.config import load_run_config

    cfg = load_run_config(args.config, args.overrides)
    result = evaluate(args.mode, cfg, args.ckpt)
    print(pd.DataFrame(result["results"]).to_string(index=False, float_format="{:.2f}".format))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _device(name: str):
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device = 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device("cuda" if name == "cuda" or name == "auto" and torch.cuda.is_available() else "cpu")


def load_model(ckpt: str, cfg):
    """The checkpoint's model, or with 'random' the config's model at its seeded init."""
    import torch

    import isolocal

    if ckpt == "random":
        torch.manual_seed(cfg.train.seed)
        return isolocal.model_from_config(cfg.model)
    if not Path(ckpt).is_file():
        raise FileNotFoundError(f"checkpoint {ckpt} does not exist; pass a checkpoint file or 'random'")
    return isolocal.load_checkpoint(ckpt)


def evaluate(mode: str, cfg, ckpt: str, progress: bool = True) -> dict:
    """Run one protocol on `cfg`'s data; returns {"results": rows, ...} with the settings used."""
    from isolocal.config import to_dict
    from isolocal.eval.features import check_feature, eval_datasets
    from isolocal.eval.finetune import finetune
    from isolocal.eval.knn import knn_per_stage
    from isolocal.eval.linear import check_optimizer, linear_per_stage

    if mode not in MODES:
        raise ValueError(f"eval mode must be one of {', '.join(MODES)}, got {mode!r}")
    e, workers = cfg.eval, cfg.data.num_workers
    if mode == "linear":
        check_optimizer(e.linear_optimizer)
    model = load_model(ckpt, cfg).to(_device(cfg.train.device))
    if mode != "finetune":
        check_feature(e.feature, model.family.has_cls)
    train_ds, test_ds = eval_datasets(cfg, model.cfg, augment_train=mode == "finetune")
    extra: dict = {}
    if mode == "finetune":
        out = finetune(model, train_ds, test_ds, e, cfg.train.seed, workers, progress)
        rows = [{"stages": f"0-{model.num_stages - 1}", "finetune_top1": out["top1"]}]
        extra["epochs"] = out["epochs"]
    else:
        if mode == "knn":
            accs = knn_per_stage(model, train_ds, test_ds, e, workers, progress)
        else:
            accs = linear_per_stage(model, train_ds, test_ds, e, cfg.train.seed, workers, progress)
        rows = [{"stage": k, "tap": tap.index, "dim": tap.dim, f"{mode}_top1": acc}
                for k, (tap, acc) in enumerate(zip(model.taps, accs))]
    return {
        "mode": mode,
        "ckpt": ckpt,
        "model": to_dict(model.cfg),
        "data": cfg.data.name,
        "train_images": len(train_ds),
        "test_images": len(test_ds),
        "eval": to_dict(e),
        "results": rows,
        **extra,
    }
