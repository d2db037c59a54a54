"""The files `isolocal analyze nmi|distance|attention` writes (what each holds: `isolocal analyze --help`),
for encoders of any format `isolocal.io.load.load_model` reads (isolocal checkpoints and runs, timm ViT,
MAE, published LocalMIM). Every checkpoint, its images and every option are loaded and checked
before anything is computed or written.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from torch import nn

from analysis.capture import TokenLayout, capture_attention, encoder_depth, is_windowed, token_layout
from analysis.figures import plot_attention_maps, plot_metric_vs_depth
from analysis.loading import ImageBatch, checkpoint_labels, input_shape, load_images
from analysis.measure import measure_attention
from analysis.metrics import patch_attention
from isolocal.io.load import load_model

METRIC_COLUMNS = {"nmi": "nmi", "distance": "attention_distance"}
WHATS = ("nmi", "distance", "attention")


def default_layers(model: nn.Module, depth: int) -> list[int]:
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


def caption(what: str, windowed: bool, images: int) -> str:
    """How the plotted numbers were computed (docs/method.md §8), for the figure caption."""
    metric = "query/key NMI" if what == "nmi" else "mean attention distance (pixels)"
    if windowed:
        return (f"Swin: {metric} within each (shifted) attention window, no CLS; "
                f"mean over windows and {images} images, then heads")
    return f"ViT: {metric} over patch tokens (CLS dropped); mean over {images} images, then heads"


def require_attention(model: nn.Module, path: Path) -> None:
    """Refuse an encoder without attention (a ResNet): NMI, distance and maps have nothing to measure."""
    family = getattr(model, "family", None)
    if family is not None and not family.has_attention:
        raise ValueError(f"{path} is a {model.cfg.arch} encoder: it has no attention, so there is nothing for NMI, "
                         "attention distance or attention maps to measure (they need a vit or swin encoder)")


@dataclass
class AttentionRun:
    """One checkpoint to analyse, validated: its model, token layout, layers, query points and images."""

    label: str
    model: nn.Module
    layout: TokenLayout
    layers: list[int]
    queries: list[tuple[int, int]]
    batch: ImageBatch


def load_runs(what: str, ckpts: Sequence[Path], labels: Sequence[str] | None, images: str,
              layers: Sequence[int] | None = None, queries: Sequence[tuple[int, int]] | None = None,
              arch_hint: Mapping[str, Any] | None = None) -> list[AttentionRun]:
    """Load every checkpoint and its images and check every option against it, before any analysis."""
    if what not in WHATS:
        raise ValueError(f"analysis {what!r} is not one of {', '.join(WHATS)}")
    labels = checkpoint_labels(ckpts, labels)
    for path in ckpts:
        if not Path(path).exists():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
    runs = []
    for label, path in zip(labels, ckpts):
        model = load_model(path, arch_hint=arch_hint, encoder_only=True)
        require_attention(model, path)
        if what == "attention" and is_windowed(model):
            raise ValueError(f"{path} is a Swin encoder: it attends within windows, so there is no image-wide "
                             "attention map; use `isolocal analyze nmi|distance` (computed per window)")
        size, chans = input_shape(model)
        layout = token_layout(model, (size, size))
        depth = encoder_depth(model)
        chosen = list(layers or (default_layers(model, depth) if what == "attention" else range(1, depth + 1)))
        bad = [layer for layer in chosen if layer > depth]
        if bad:
            raise ValueError(f"--layers {bad} out of range for {path} (layers 1..{depth})")
        points = list(queries or default_queries(layout.grid))
        outside = [q for q in points if not (0 <= q[0] < layout.grid[0] and 0 <= q[1] < layout.grid[1])]
        if outside:
            raise ValueError(f"--query {outside} outside the {layout.grid} token grid of {path}")
        runs.append(AttentionRun(label, model, layout, chosen, points, load_images(images, size, chans)))
    return runs


def write_metric(what: str, runs: list[AttentionRun], out: Path, pdf: bool = False) -> list[Path]:
    """``<what>.png`` with one curve per run and ``<what>.csv`` with one row per layer."""
    column = METRIC_COLUMNS[what]
    tables = {run.label: measure_attention(run.model, run.batch.images, run.layers) for run in runs}
    captions = {caption(what, is_windowed(run.model), len(run.batch.names)) for run in runs}
    written = plot_metric_vs_depth(tables, column, out / what, pdf, "\n".join(sorted(captions)))
    wide = [
        t[["layer", column, f"{column}_heads"]].rename(columns={column: label, f"{column}_heads": f"{label}_heads"})
        for label, t in tables.items()
    ]
    csv = out / f"{what}.csv"
    functools.reduce(lambda a, b: a.merge(b, on="layer", how="outer"), wide).to_csv(csv, index=False)
    return written + [csv]


def write_attention_maps(runs: list[AttentionRun], out: Path, pdf: bool = False) -> list[Path]:
    """Per run and image ``attention_<label>_<image>.png``; per run ``attention_<label>.csv`` holding,
    per layer, each (image, query)'s head-mean attention row over the token grid (row-major)."""
    written: list[Path] = []
    for run in runs:
        attn = capture_attention(run.model, run.batch.images)
        grid, prefix = run.layout.grid, run.layout.num_prefix_tokens
        rows = {layer: {"layer": layer} for layer in run.layers}
        for index, name in enumerate(run.batch.names):
            written += plot_attention_maps(
                run.batch.images[index], attn, run.layers, run.queries, grid, run.layout.patch[0],
                out / f"attention_{run.label}_{name}.png", prefix, run.batch.mean, run.batch.std, pdf, index,
            )
            for layer in run.layers:
                head_mean = patch_attention(attn[layer - 1][index], prefix).mean(dim=0)
                for r, c in run.queries:
                    rows[layer][f"{name} ({r},{c})"] = head_mean[r * grid[1] + c].tolist()
        csv = out / f"attention_{run.label}.csv"
        pd.DataFrame(list(rows.values())).to_csv(csv, index=False)
        written.append(csv)
    return written


def write_attention_files(what: str, ckpts: Sequence[Path], images: str, out: Path, *,
                          labels: Sequence[str] | None = None, layers: Sequence[int] | None = None,
                          queries: Sequence[tuple[int, int]] | None = None, num_heads: int | None = None,
                          pdf: bool = False) -> list[Path]:
    """`isolocal analyze nmi|distance|attention`: the files written. ``num_heads``
    is needed for timm-format checkpoints of non-standard width only."""
    runs = load_runs(what, ckpts, labels, images, layers, queries, {"num_heads": num_heads} if num_heads else None)
    out.mkdir(parents=True, exist_ok=True)
    return write_attention_maps(runs, out, pdf) if what == "attention" else write_metric(what, runs, out, pdf)
