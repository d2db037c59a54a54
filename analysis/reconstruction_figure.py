"""The reconstruction grid: one row per image, input, masked input, then per stage target | prediction;
and the files `isolocal analyze reconstruct` writes per run (`save_reconstruction`, `run_reconstruct`).

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
import torch
from matplotlib.figure import Figure
from torch import Tensor

from analysis.figures import _save, _to_display
from analysis.glyphs import hog_glyphs
from analysis.loading import ImageBatch, checkpoint_labels, input_shape, load_images
from analysis.reconstruction import (StageReconstruction, check_options, error_table, pixel_mask, pixel_views,
                                     reconstruct)
from isolocal.config import RunConfig
from isolocal.io.load import load_model
from isolocal.models.encoder import StagewiseEncoder

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


def glyph_panels(rec: StageReconstruction, model: StagewiseEncoder, index: int,
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


def plot_reconstruction(model: StagewiseEncoder, batch: ImageBatch, mask: Tensor, recs: list[StageReconstruction],
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
            head = f"stage {rec.stage}, {rec.cell} px cells\n" if i == 0 else ""
            err = f"err {shown[i, rec.stage]:.4f}"
            if pixels:
                v = views[k]
                pred_img = _to_display(v["pred_stats"][i].float(), batch.mean, batch.std)
                panels += [(_normalized(v["target"][i]), f"{head}target (cell-normalized)"),
                           (_normalized(v["pred"][i]), f"{head}prediction, normalized\n{err}"),
                           (_rgb(pred_img), f"{head}prediction\n+ cell mean/var")]
            else:
                target, pred = glyph_panels(rec, model, i, hog_channels)
                panels += [(target, f"{head}HOG target"), (pred, f"{head}prediction\n{err}")]
        for ax, (arr, label) in zip(axes[i], panels):
            # small images are magnified (nearest keeps pixels square), glyph images are shrunk (smoothly)
            ax.imshow(arr, interpolation="nearest" if arr.shape[0] <= model.img_size else "antialiased")
            ax.set_title(label, fontsize=7)
            ax.set_axis_off()
    fig.suptitle(title, fontsize=8)
    return _save(fig, path, pdf)


# ---- one run: figure + CSV ------------------------------------------------------------------------

def write_reconstruction(model: StagewiseEncoder, batch: ImageBatch, out_dir: str | Path, label: str, mask_seed: int = 0,
                         pdf: bool = False, hog_channels: str = "mean") -> list[Path]:
    """``reconstruct_<label>.png`` (and .pdf) and ``reconstruct_<label>.csv`` for an ``ImageBatch``
    under the model's own random mask drawn from ``mask_seed``."""
    check_options(mask_seed, hog_channels)
    if not model.plan.target_stages:
        raise ValueError(f"{label}: no stage has a mim head (model.objective = {model.cfg.objective!r}); "
                         "nothing to reconstruct")
    mask = model.random_mask(len(batch.names), torch.Generator().manual_seed(mask_seed))
    recs = reconstruct(model, batch.images, mask)
    table = error_table(recs, batch.names, model.cfg.target)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv = out / f"reconstruct_{label}.csv"
    table.insert(0, "run", label)
    table.insert(1, "mask_seed", mask_seed)
    table.to_csv(csv, index=False)
    title = (f"{label}: {model.cfg.target} targets, mask ratio {model.cfg.mask_ratio}, mask seed {mask_seed}; "
             "err = mean squared error over masked cells (the stage's training loss)")
    written = plot_reconstruction(model, batch, mask, recs, table, out / f"reconstruct_{label}.png", title, pdf,
                                  hog_channels)
    return written + [csv]


def save_reconstruction(run: str | Path | StagewiseEncoder, images: str, out_dir: str | Path, mask_seed: int = 0,
                        pdf: bool = False, label: str | None = None, hog_channels: str = "mean") -> list[Path]:
    """Figure + CSV of one run (a checkpoint path, run directory or model) on the images of ``images``
    (``analysis.loading.IMAGE_SPEC_HELP``); the label defaults to the checkpoint's stem or run directory."""
    check_options(mask_seed, hog_channels)
    if isinstance(run, StagewiseEncoder):
        model, name = run, label or "model"
    else:
        model, name = load_model(run), label or Path(run).stem
    return write_reconstruction(model, load_images(images, *input_shape(model)), out_dir, name, mask_seed, pdf,
                                hog_channels)


def run_reconstruct(ckpts: list[Path], labels: list[str] | None, images: str, out_dir: Path, mask_seed: int = 0,
                    pdf: bool = False, hog_channels: str = "mean", cfg: RunConfig | None = None) -> list[Path]:
    """``isolocal analyze reconstruct``: every checkpoint and its images loaded and checked first; the
    labels default to the checkpoints' stems. `cfg` gives the model of published LocalMIM checkpoints
    (`isolocal.io.load.load_model`); isolocal checkpoints carry their own."""
    labels = checkpoint_labels(ckpts, labels)
    check_options(mask_seed, hog_channels)
    jobs = []
    for path in ckpts:
        model = load_model(path, cfg)
        jobs.append((model, load_images(images, *input_shape(model))))
    written: list[Path] = []
    for label, (model, batch) in zip(labels, jobs):
        written += write_reconstruction(model, batch, out_dir, label, mask_seed, pdf, hog_channels)
    return written
