"""`isolocal analyze nmi|distance|attention|reconstruct`: attention and reconstruction figures and CSVs.

nmi / distance: query/key NMI or mean attention distance (pixels) against depth, one curve per
checkpoint (labelled by --label, default the file stem), written as ``<what>.png`` and
``<what>.csv`` (one row per layer; per checkpoint a head-mean column and a per-head list column).
attention: per checkpoint and image, ``attention_<label>_<image>.png`` with the image (query patch
boxed) and that query's head-mean attention over the token grid at each chosen layer, plus
``attention_<label>.csv`` (one row per layer; per image and query the attention row, row-major).
reconstruct (isolocal checkpoints or run directories; a published LocalMIM checkpoint with -c or --set
naming its model, e.g. --set preset=localmim_vit_base): per checkpoint ``reconstruct_<label>.png``,
one row per image: input, masked input (mask drawn from --mask-seed), then per stage its target at
its own cell size and its decoder's prediction on the masked cells (visible cells pasted back);
pixel targets also un-normalized with each cell's mean and variance, HOG targets as glyphs. Each
prediction carries its masked-cell error (the stage's loss), also in ``reconstruct_<label>.csv``.
The work is `analysis.attention_files.write_attention_files` and
`analysis.reconstruction_figure.run_reconstruct`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from isolocal.cli.options import add_import_option
from isolocal.config.imports import load_imports
from isolocal.config.load import load_run_config
from isolocal.config.schema import IMAGE_SPEC_HELP
from isolocal.io.paths import check_writable_dir


def _int_list(text: str) -> list[int]:
    try:
        values = [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: layers are 1-based, so each must be >= 1")
    return values


def _point(text: str) -> tuple[int, int]:
    try:
        row, col = (int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a query point ROW,COL in patch units") from None
    return row, col


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("analyze", help="attention NMI, distance and maps; per-stage reconstructions",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("nmi", "distance", "attention", "reconstruct"))
    p.add_argument("--ckpt", action="append", required=True, type=Path,
                   help="isolocal, timm ViT, MAE or LocalMIM checkpoint; repeat to overlay several")
    p.add_argument("--label", action="append", help="legend/file label per --ckpt (default: file stem)")
    p.add_argument("--images", required=True, help=IMAGE_SPEC_HELP)
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--pdf", action="store_true", help="also write PDF figures")
    p.add_argument("--layers", type=_int_list,
                   help="1-based layers, e.g. 2,4,10,12 (default: all for nmi/distance; for attention "
                        "2,4,10,12 at depth 12, else the tap layers)")
    p.add_argument("--query", action="append", type=_point,
                   help="query patch ROW,COL for attention maps; repeatable (default: centre and (g/4, g/4))")
    p.add_argument("--heads", type=int, help="num_heads for timm-format checkpoints of non-standard width")
    p.add_argument("-c", "--config", default=None,
                   help="reconstruct: run config TOML whose model is a published LocalMIM checkpoint's "
                        "(isolocal checkpoints carry their own)")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="reconstruct: config overrides naming a published LocalMIM checkpoint's model, "
                        "e.g. --set preset=localmim_vit_base")
    add_import_option(p)
    p.add_argument("--mask-seed", type=int, default=0, help="reconstruct: seed of the model's random mask (default 0)")
    p.add_argument("--hog-channels", choices=("mean", "rgb"), default="mean",
                   help="reconstruct: HOG glyphs averaged over colour channels or one colour per channel")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    given = args.config is not None or bool(args.overrides)
    if given and args.what != "reconstruct":
        raise ValueError(f"-c / --set name the model of a published LocalMIM checkpoint for `analyze reconstruct`; "
                         f"`analyze {args.what}` reads every encoder without them")
    cfg = load_run_config(args.config, args.overrides, args.imports) if given else None
    if cfg is None:
        load_imports(args.imports)
    check_writable_dir(args.out, "--out directory")
    if args.what == "reconstruct":
        from analysis.reconstruction_figure import run_reconstruct  # deferred: --help runs without torch

        written = run_reconstruct(args.ckpt, args.label, args.images, args.out, args.mask_seed, args.pdf,
                                  args.hog_channels, cfg)
    else:
        from analysis.attention_files import write_attention_files  # deferred: --help runs without torch

        written = write_attention_files(args.what, args.ckpt, args.images, args.out, labels=args.label,
                                        layers=args.layers, queries=args.query, num_heads=args.heads, pdf=args.pdf)
    for path in written:
        print(path)
    return 0
