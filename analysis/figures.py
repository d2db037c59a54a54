"""Figures for the attention analysis: metrics against depth and attention maps over an image.

Figures are drawn on bare ``matplotlib.figure.Figure`` objects with the Agg canvas, never through
pyplot, so they work headless and do not switch the backend of an interactive session.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator
from torch import Tensor

from analysis.metrics import patch_attention


def _save(fig: Figure, path: str | Path, pdf: bool) -> list[Path]:
    """Save ``fig`` as PNG (and PDF) next to ``path``, whatever its suffix; return the files."""
    FigureCanvasAgg(fig)
    base = Path(path)
    base.parent.mkdir(parents=True, exist_ok=True)
    paths = [base.with_suffix(".png")] + ([base.with_suffix(".pdf")] if pdf else [])
    for p in paths:
        fig.savefig(p, dpi=150, bbox_inches="tight")
    return paths


def plot_metric_vs_depth(
    tables: dict[str, pd.DataFrame], column: str, path: str | Path, pdf: bool = False, caption: str | None = None
) -> list[Path]:
    """Overlay ``column`` against ``layer`` for several runs (e.g. global, isolated, top-only);
    ``caption`` (e.g. how the metric was defined) is printed under the axes."""
    fig = Figure(figsize=(5, 3.5))
    ax = fig.add_subplot()
    for name, table in tables.items():
        ax.plot(table["layer"], table[column], marker="o", label=name)
    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(column.replace("_", " "))
    ax.grid(alpha=0.3)
    ax.legend()
    if caption:
        fig.text(0.5, -0.02, caption, ha="center", va="top", fontsize=7, wrap=True)
    return _save(fig, path, pdf)


def _to_display(image: Tensor | np.ndarray, mean: Sequence[float] | None, std: Sequence[float] | None) -> np.ndarray:
    """An (H, W, C) float array in [0, 1] from a normalized (C, H, W) tensor or an (H, W, C) array."""
    if isinstance(image, Tensor):
        img = image.detach().cpu().double()
        if std is not None:
            img = img * torch.tensor(std, dtype=img.dtype).view(-1, 1, 1)
        if mean is not None:
            img = img + torch.tensor(mean, dtype=img.dtype).view(-1, 1, 1)
        arr = img.permute(1, 2, 0).numpy()
    else:
        arr = np.asarray(image, dtype=np.float64)
        if np.issubdtype(np.asarray(image).dtype, np.integer):
            arr = arr / 255.0
        if arr.ndim == 2:
            arr = arr[..., None]
    return np.clip(arr, 0.0, 1.0)


def plot_attention_maps(
    image: Tensor | np.ndarray,
    attn_layers: Sequence[Tensor],
    layers: Sequence[int],
    query_points: Sequence[tuple[int, int]],
    grid: tuple[int, int],
    patch: int,
    path: str | Path,
    num_prefix_tokens: int = 1,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    pdf: bool = False,
    index: int = 0,
) -> list[Path]:
    """Attention of chosen query patches over the image, one row per query point.

    Column 0 shows the image with the query patch boxed; then one panel per 1-based layer in
    ``layers`` (indexing ``attn_layers``) with that query's head-mean attention row reshaped to
    ``grid``, upsampled bilinearly to the image and overlaid. ``query_points`` are (row, col) in
    patch units; ``index`` picks the image within a batched (B, H, N, N) attention.
    """
    img = _to_display(image, mean, std)
    size = (grid[0] * patch, grid[1] * patch)
    if img.shape[:2] != size:
        raise ValueError(f"image is {img.shape[:2]}, but grid {grid} x patch {patch} is {size}")
    gray = img.shape[2] == 1
    shown = img[..., 0] if gray else img
    cmap = "gray" if gray else None

    fig = Figure(figsize=(2.2 * (len(layers) + 1), 2.2 * len(query_points)))
    axes = fig.subplots(len(query_points), len(layers) + 1, squeeze=False)
    for row, (qr, qc) in enumerate(query_points):
        if not (0 <= qr < grid[0] and 0 <= qc < grid[1]):
            raise ValueError(f"query point {(qr, qc)} outside grid {grid}")
        query = qr * grid[1] + qc
        ax = axes[row, 0]
        ax.imshow(shown, cmap=cmap)
        ax.add_patch(Rectangle((qc * patch - 0.5, qr * patch - 0.5), patch, patch, fill=False, ec="red", lw=2))
        ax.set_title(f"query ({qr}, {qc})", fontsize=8)
        for col, layer in enumerate(layers, start=1):
            attn = attn_layers[layer - 1]
            attn = attn[index] if attn.dim() == 4 else attn
            heat = patch_attention(attn, num_prefix_tokens)[:, query].mean(dim=0).float()
            heat = F.interpolate(heat.view(1, 1, *grid).cpu(), size=size, mode="bilinear", align_corners=False)[0, 0]
            ax = axes[row, col]
            ax.imshow(shown, cmap=cmap)
            ax.imshow(heat.numpy(), cmap="inferno", alpha=0.6)
            ax.add_patch(Rectangle((qc * patch - 0.5, qr * patch - 0.5), patch, patch, fill=False, ec="cyan", lw=1))
            ax.set_title(f"layer {layer}", fontsize=8)
    for ax in axes.flat:
        ax.set_axis_off()
    return _save(fig, path, pdf)
