"""`isolocal eval knn|linear|head|finetune -c run.toml --ckpt PATH|random [--set k=v] [--out results.json]`.

`eval knn linear` runs both on features extracted once; `head` adds the top-1 of each stage's own
`classify` head. Every selection (each probe's epoch, the best stage, fine-tuning's epoch) is made on a
validation split carved out of the labelled training images (`eval.val_fraction`); the test split is read
once, afterwards, or never with `--val-only` (tune settings with it). Prints one table row per stage (k-NN, linear, head) or one for the whole encoder (fine-tuning) and writes the same numbers, with the model and
eval settings that produced them, as JSON. `--ckpt random` evaluates the config's model at its
seeded random init: the baseline every number is judged against. `--ckpt` takes any isolocal
checkpoint or run directory (single-process or pipeline), or a published LocalMIM checkpoint, whose
model the config names (-c, or --set preset=localmim_vit_base). The work is `isolocal.eval.protocols.evaluate`.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from isolocal.cli.options import add_import_option
from isolocal.config.load import load_run_config
from isolocal.config.schema import EVAL_MODES
from isolocal.io.paths import check_writable_file


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="evaluate an encoder: k-NN, per-stage linear probes, fine-tuning",
                              description=__doc__.splitlines()[0])
    p.add_argument("modes", nargs="+", choices=EVAL_MODES, metavar="{knn,linear,head,finetune}",
                   help="knn, linear (sharing one feature extraction) and/or head, or finetune")
    p.add_argument("-c", "--config", default=None, help="run config TOML (data and [eval] settings)")
    p.add_argument("--ckpt", required=True,
                   help="isolocal checkpoint or run directory, a published LocalMIM checkpoint of the config's model, "
                        "or 'random' for the config's model at init")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set eval.train_subset=10000 eval.feature=mean")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    add_import_option(p)
    p.add_argument("--val-only", action="store_true",
                   help="stop after the validation numbers, never reading the test split (for tuning a setting)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = load_run_config(args.config, args.overrides, args.imports)
    if args.out:
        check_writable_file(args.out, "--out file")
    import pandas as pd  # deferred: --help runs without torch

    from isolocal.eval.protocols import evaluate  # deferred: --help runs without torch

    result = evaluate(args.modes, cfg, args.ckpt, read_test=not args.val_only)
    print(pd.DataFrame(result["results"]).to_string(index=False, float_format="{:.2f}".format))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    return 0
