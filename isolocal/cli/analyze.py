"""`isolocal analyze nmi|distance|attention|reconstruct`: attention and reconstruction figures and CSVs.

nmi / distance: query/key NMI or mean attention distance (pixels) against depth, one curve per
checkpoint (labelled by --label, default the file stem), written as ``<what>.png`` and
``<what>.csv`` (one row per layer; per checkpoint a head-mean column and a per-head list column).
attention: per checkpoint and image, ``attention_<label>_<image>.png`` with the image (query patch
boxed) and that query's head-mean attention over the token grid at each chosen layer, plus
``attention_<label>.csv`` (one row per layer; per image and query the attention row, row-major).
reconstruct (isolocal checkpoints or run directories): per checkpoint ``reconstruct_<label>.png``,
one row per image: input, masked input (mask drawn from --mask-seed), then per stage its target at
its own cell size and its decoder's prediction on the masked cells (visible cells pasted back);
pixel targets also un-normalized with each cell's mean and variance, HOG targets as glyphs. Each
prediction carries its masked-cell error (the stage's loss), also in ``reconstruct_<label>.csv``.
"""

from __future__ import annotations

import argparse
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from analysis.loading import IMAGE_SPEC_HELP

METRIC_COLUMNS = {"nmi": "nmi", "distance": "attention_distance"}


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
    p.add_argument("--mask-seed", type=int, default=0, help="reconstruct: seed of the model's random mask (default 0)")
    p.add_argument("--hog-channels", choices=("mean", "rgb"), default="mean",
                   help="reconstruct: HOG glyphs averaged over colour channels or one colour per channel")
    p.set_defaults(func=run)


def default_layers(model: object, depth: int) -> list[int]:
    """Layers for attention maps: the poster's 2, 4, 10, 12 at depth 12; otherwise an isolocal
    model's tap layers, or the published LocalMIM taps (2, 4, depth-2, depth) of a timm ViT."""
    if depth == 12:
        return [2, 4, 10, 12]
    cfg = getattr(model, "cfg", None)
    if cfg is not None and hasattr(cfg, "taps"):
        return [t + 1 for t in cfg.taps]
    return sorted({2, 4, depth - 2, depth}) if depth >= 4 else list(range(1, depth + 1))


def default_queries(grid: tuple[int, int]) -> list[tuple[int, int]]:
    """The centre patch (object) and one a quarter in from the top-left corner (often background)."""
    return [(grid[0] // 2, grid[1] // 2), (grid[0] // 4, grid[1] // 4)]


def _caption(what: str, windowed: bool, images: int) -> str:
    """How the plotted numbers were computed (docs/method.md §8), for the figure caption."""
    metric = "query/key NMI" if what == "nmi" else "mean attention distance (pixels)"
    if windowed:
        return (f"Swin: {metric} within each (shifted) attention window, no CLS; "
                f"mean over windows and {images} images, then heads")
    return f"ViT: {metric} over patch tokens (CLS dropped); mean over {images} images, then heads"


def _labels(args: argparse.Namespace) -> list[str]:
    labels = args.label or [p.stem for p in args.ckpt]
    if len(labels) != len(args.ckpt):
        raise ValueError(f"got {len(labels)} --label for {len(args.ckpt)} --ckpt; give one label per checkpoint")
    if len(set(labels)) != len(labels):
        raise ValueError(f"labels {labels} are not unique; pass --label per checkpoint")
    return labels


@dataclass
class _Run:
    """One checkpoint to analyse, validated: its model, layers, query points and images."""

    label: str
    model: Any
    layout: Any
    layers: list[int]
    queries: list[tuple[int, int]]
    batch: Any


def _load_runs(args: argparse.Namespace) -> list[_Run]:
    """Load every checkpoint and its images and check every option against it, before any analysis."""
    from analysis.capture import is_windowed
    from analysis.loading import encoder_depth, input_shape, load_for_analysis, load_images

    labels = _labels(args)
    for path in args.ckpt:
        if not path.exists():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
    hint = {"num_heads": args.heads} if args.heads else None
    runs = []
    for label, path in zip(labels, args.ckpt):
        model, layout = load_for_analysis(path, hint)
        if args.what == "attention" and is_windowed(model):
            raise ValueError(f"{path} is a Swin encoder: it attends within windows, so there is no image-wide "
                             "attention map; use `isolocal analyze nmi|distance` (computed per window)")
        depth = encoder_depth(model)
        layers = args.layers or (default_layers(model, depth) if args.what == "attention" else list(range(1, depth + 1)))
        bad = [layer for layer in layers if layer > depth]
        if bad:
            raise ValueError(f"--layers {bad} out of range for {path} (layers 1..{depth})")
        queries = args.query or default_queries(layout.grid)
        outside = [q for q in queries if not (0 <= q[0] < layout.grid[0] and 0 <= q[1] < layout.grid[1])]
        if outside:
            raise ValueError(f"--query {outside} outside the {layout.grid} token grid of {path}")
        runs.append(_Run(label, model, layout, layers, queries, load_images(args.images, *input_shape(model))))
    return runs


def _write_metric(args: argparse.Namespace, runs: list[_Run]) -> list[Path]:
    """``<what>.png`` with one curve per run and ``<what>.csv`` with one row per layer."""
    from analysis.capture import attention_layouts, capture_attention, is_windowed
    from analysis.figures import plot_metric_vs_depth
    from analysis.loading import encoder_depth
    from analysis.metrics import layout_table

    column = METRIC_COLUMNS[args.what]
    tables, captions = {}, set()
    for run in runs:
        attn = capture_attention(run.model, run.batch.images, run.layers)
        layouts = attention_layouts(run.model, tuple(run.batch.images.shape[-2:]), encoder_depth(run.model))
        table = layout_table(attn, [layouts[i - 1] for i in run.layers])
        tables[run.label] = table.assign(layer=run.layers)
        captions.add(_caption(args.what, is_windowed(run.model), len(run.batch.names)))
    written = plot_metric_vs_depth(tables, column, args.out / args.what, args.pdf, "\n".join(sorted(captions)))
    wide = [
        t[["layer", column, f"{column}_heads"]].rename(columns={column: label, f"{column}_heads": f"{label}_heads"})
        for label, t in tables.items()
    ]
    csv = args.out / f"{args.what}.csv"
    functools.reduce(lambda a, b: a.merge(b, on="layer", how="outer"), wide).to_csv(csv, index=False)
    return written + [csv]


def _write_attention(args: argparse.Namespace, runs: list[_Run]) -> list[Path]:
    """Per run and image ``attention_<label>_<image>.png``; per run ``attention_<label>.csv`` holding,
    per layer, each (image, query)'s head-mean attention row over the token grid (row-major)."""
    import pandas as pd

    from analysis.capture import capture_attention
    from analysis.figures import plot_attention_maps
    from analysis.metrics import patch_attention

    written: list[Path] = []
    for run in runs:
        attn = capture_attention(run.model, run.batch.images)
        grid, prefix = run.layout.grid, run.layout.num_prefix_tokens
        rows = {layer: {"layer": layer} for layer in run.layers}
        for index, name in enumerate(run.batch.names):
            written += plot_attention_maps(
                run.batch.images[index], attn, run.layers, run.queries, grid, run.layout.patch[0],
                args.out / f"attention_{run.label}_{name}.png", prefix, run.batch.mean, run.batch.std, args.pdf, index,
            )
            for layer in run.layers:
                head_mean = patch_attention(attn[layer - 1][index], prefix).mean(dim=0)
                for r, c in run.queries:
                    rows[layer][f"{name} ({r},{c})"] = head_mean[r * grid[1] + c].tolist()
        csv = args.out / f"attention_{run.label}.csv"
        pd.DataFrame(list(rows.values())).to_csv(csv, index=False)
        written.append(csv)
    return written


def run(args: argparse.Namespace) -> int:
    if args.what == "reconstruct":
        from analysis.reconstruction_figure import run_reconstruct

        written = run_reconstruct(args.ckpt, _labels(args), args.images, args.out, args.mask_seed, args.pdf,
                                  args.hog_channels)
    else:
        runs = _load_runs(args)
        args.out.mkdir(parents=True, exist_ok=True)
        written = _write_attention(args, runs) if args.what == "attention" else _write_metric(args, runs)
    for path in written:
        print(path)
    return 0
