"""The reconstruction grid: one row per image, input, masked input, then per stage target | prediction.

Pixel targets get three panels per stage: the normalized target (each cell at zero mean and unit
variance, which shows the stage's cell size), the normalized prediction, and the prediction brought
back to image space with each cell's own mean and variance (MAE's visualisation). HOG targets get
two: target glyphs and predicted glyphs (``analysis.glyphs``). Predictions show the masked cells
only, the visible ones pasted back from the target (HOG: masked cells shaded) or the input (pixels).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from torch import Tensor

from analysis.figures import _save, _to_display
from analysis.glyphs import hog_glyphs
from analysis.loading import ImageBatch
from analysis.reconstruction import StageReconstruction, pixel_mask, pixel_views
from isolocal.models.mim import LocalMIM

MASK_COLOUR = np.array([0.20, 0.25, 0.45])  # masked patches in the masked input, and HOG cell shading
PANEL_INCHES = 2.0
GLYPH_PANEL_PX = 300  # HOG glyphs are drawn at about the panel's size at 150 dpi, so lines stay sharp
NORMALIZED_RANGE = 2.5  # normalized pixels are shown over [-2.5, 2.5]


def _rgb(arr: np.ndarray) -> np.ndarray:
    """(H, W, 1|3) or (H, W) in [0, 1] -> (H, W, 3)."""
    arr = arr if arr.ndim == 3 else arr[..., None]
    return np.repeat(arr, 3, axis=2) if arr.shape[2] == 1 else arr


def _normalized(image: Tensor) -> np.ndarray:
    """A (C, H, W) image in per-cell normalized units -> (H, W, 3) in [0, 1]."""
    arr = image.detach().cpu().permute(1, 2, 0).numpy()
    return _rgb(np.clip((arr + NORMALIZED_RANGE) / (2 * NORMALIZED_RANGE), 0.0, 1.0))


def _glyph_panels(rec: StageReconstruction, model: LocalMIM, index: int,
                  channels: str) -> tuple[np.ndarray, np.ndarray]:
    """(target glyphs, prediction glyphs on masked cells with the visible cells' target glyphs)."""
    zoom = max(1, -(-GLYPH_PANEL_PX // model.img_size))
    cfg = model.cfg
    weight = rec.weight[index].cpu().numpy()
    target = rec.target[index].cpu().numpy()
    pasted = np.where(weight[:, None] > 0, rec.pred[index].cpu().numpy(), target)

    def draw(cells: np.ndarray) -> np.ndarray:
        return _rgb(hog_glyphs(cells, rec.grid, cfg.in_chans, cfg.hog_nbins, rec.cell * zoom, channels))

    shade = np.kron(weight.reshape(rec.grid, rec.grid), np.ones((rec.cell * zoom,) * 2))[..., None] * MASK_COLOUR * 0.6
    return draw(target), np.maximum(draw(pasted), shade)


def plot_reconstruction(model: LocalMIM, batch: ImageBatch, mask: Tensor, recs: list[StageReconstruction],
                        errors: pd.DataFrame, path: str | Path, title: str, pdf: bool = False,
                        hog_channels: str = "mean") -> list[Path]:
    """The grid for an ``ImageBatch`` under ``mask``; each prediction panel carries its image's
    masked-cell error for that stage, read from ``errors`` (``error_table``, the CSV's rows)."""
    pixels = model.cfg.target == "pixels"
    per_stage = 3 if pixels else 2
    rows, cols = len(batch.names), 2 + per_stage * len(recs)
    masked = pixel_mask(model, mask.cpu())
    images = batch.images.cpu()
    views = [pixel_views(rec, images, masked) for rec in recs] if pixels else None
    shown = errors.set_index(["index", "stage"])["masked_cell_error"]

    fig = Figure(figsize=(PANEL_INCHES * cols, (PANEL_INCHES + 0.2) * rows + 0.5))
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, name in enumerate(batch.names):
        image = _rgb(_to_display(images[i], batch.mean, batch.std))
        m = masked[i, 0].numpy()[..., None]
        panels = [(image, name), (image * (1 - m) + MASK_COLOUR * m, "masked" if i == 0 else "")]
        for k, rec in enumerate(recs):
            head = f"stage {k}, {rec.cell} px cells\n" if i == 0 else ""
            err = f"err {shown[i, k]:.4f}"
            if pixels:
                v = views[k]
                pred_img = _to_display(v["pred_stats"][i].float(), batch.mean, batch.std)
                panels += [(_normalized(v["target"][i]), f"{head}target (cell-normalized)"),
                           (_normalized(v["pred"][i]), f"{head}prediction, normalized\n{err}"),
                           (_rgb(pred_img), f"{head}prediction\n+ cell mean/var")]
            else:
                target, pred = _glyph_panels(rec, model, i, hog_channels)
                panels += [(target, f"{head}HOG target"), (pred, f"{head}prediction\n{err}")]
        for ax, (arr, label) in zip(axes[i], panels):
            # small images are magnified (nearest keeps pixels square), glyph images are shrunk (smoothly)
            ax.imshow(arr, interpolation="nearest" if arr.shape[0] <= model.img_size else "antialiased")
            ax.set_title(label, fontsize=7)
            ax.set_axis_off()
    fig.suptitle(title, fontsize=8)
    return _save(fig, path, pdf)

