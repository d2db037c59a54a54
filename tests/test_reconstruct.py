"""Per-stage reconstructions: errors equal the model's own losses, pixel views invert the target's
normalization, HOG glyphs draw each bin as one line at its angle, and `isolocal analyze reconstruct`."""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from scipy import ndimage

import analysis
import isolocal
from analysis.glyphs import bin_angles, draw_glyphs, hog_glyphs
from analysis.loading import load_images
from analysis.reconstruction import pixel_mask, pixel_views, unpatchify
from analysis.reconstruction_figure import MASK_COLOUR, glyph_panels
from isolocal.cli import main
from isolocal.config import RunConfig, to_dict
from isolocal.data import FASHION_MNIST_ROOT
from isolocal.core.targets import hog

needs_fmnist = pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_ROOT), reason="apt-get install dataset-fashion-mnist")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MODELS = {  # (preset, overrides): ViT and Swin, HOG and pixel targets; every pixel cell has > 1 value
    "vit_hog": ("localmim_vit_nano", {}),
    "vit_pixels": ("localmim_vit_nano", {"target": "pixels", "scales": [2.0, 1.0, 1.0, 0.5]}),
    "swin_hog": ("localmim_swin_nano", {}),
    "swin_pixels": ("localmim_swin_nano_pix", {}),
}


def _model(name: str) -> isolocal.StagewiseEncoder:
    preset, overrides = MODELS[name]
    return isolocal.create_model(preset, **overrides).eval()


# ---- glyphs ----------------------------------------------------------------------------------------

def _line_geometry(img: np.ndarray) -> tuple[float, float, float, np.ndarray]:
    """(angle in degrees mod 180 counter-clockwise from the displayed x axis, length along it, largest
    distance of a strong pixel from the fitted line, centroid (row, col)) of the lit pixels."""
    rows, cols = np.nonzero(img)
    w = img[rows, cols]
    centre = np.array([np.average(rows, weights=w), np.average(cols, weights=w)])
    y, x = -(rows - centre[0]), cols - centre[1]  # y up
    cov = np.cov(np.stack([x, y]), aweights=w)
    _, evecs = np.linalg.eigh(cov)
    axis = evecs[:, -1]
    angle = math.degrees(math.atan2(axis[1], axis[0])) % 180
    strong = img[rows, cols] >= 0.5
    along = x * axis[0] + y * axis[1]
    across = np.abs(-x * axis[1] + y * axis[0])
    return angle, float(along[strong].max() - along[strong].min()), float(across[strong].max()), centre


def _angle_diff(a: float, b: float) -> float:
    d = abs(a - b) % 180
    return min(d, 180 - d)


@pytest.mark.parametrize("nbins", [9, 18])
@pytest.mark.parametrize("value", [1.0, 0.6])
def test_one_bin_histogram_is_one_line_at_the_bin_angle(nbins, value):
    cell = 64
    for b, expected in enumerate(np.degrees(bin_angles(nbins))):
        hist = np.zeros((2, 2, nbins))
        hist[1, 0, b] = value  # bottom-left cell only
        img = draw_glyphs(hist, cell)
        rows, cols = np.nonzero(img)
        assert rows.min() >= cell and cols.max() < cell, "pixels outside the histogram's cell"
        _, count = ndimage.label(img >= 0.5, structure=np.ones((3, 3)))
        assert count == 1, f"bin {b}: {count} separate strokes, expected one line"
        angle, length, spread, centre = _line_geometry(img)
        rounding = math.degrees(math.atan2(1.5, value * (cell - 1)))  # end points snap to whole pixels
        assert _angle_diff(angle, expected) < rounding, f"bin {b}: line at {angle:.1f} deg, bin angle {expected:.1f}"
        assert spread <= 1.0, f"bin {b}: strong pixels {spread:.2f} px off the line"
        assert abs(length - value * (cell - 1)) <= 2.0, f"bin {b}: length {length:.1f}, expected {value * (cell - 1)}"
        np.testing.assert_allclose(centre, [1.5 * cell - 0.5, 0.5 * cell - 0.5], atol=1.0)


@pytest.mark.parametrize("picture, edge_degrees", [
    ("horizontal", 0.0), ("vertical", 90.0), ("rising", 45.0), ("falling", 135.0),
])
def test_glyphs_of_real_hog_targets_follow_the_image_edges(picture, edge_degrees):
    """The bin -> angle convention agrees with isolocal.core.targets: a glyph runs along the edge."""
    r, c = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    image = {"horizontal": (r < 8).float(), "vertical": (c < 8).float(), "rising": r + c, "falling": c - r}[picture]
    nbins = 9
    cells = hog(image[None, None], cell=16, nbins=nbins)[0].numpy()
    glyph = hog_glyphs(cells, 1, 1, nbins, 64)
    angle, *_ = _line_geometry(glyph)
    assert _angle_diff(angle, edge_degrees) <= 90 / nbins + 1.0, f"{picture} edge drawn at {angle:.1f} deg"


def test_rgb_glyphs_draw_each_channel_in_its_colour():
    nbins = 4
    cells = np.zeros((1, 3 * nbins))
    cells[0, 1] = 1.0  # red: bin 1
    cells[0, nbins + 3] = 1.0  # green: bin 3
    img = hog_glyphs(cells, 1, 3, nbins, 33, channels="rgb")
    assert img.shape == (33, 33, 3) and not img[..., 2].any()
    assert _angle_diff(_line_geometry(img[..., 0])[0], np.degrees(bin_angles(nbins)[1])) < 1.0
    assert _angle_diff(_line_geometry(img[..., 1])[0], np.degrees(bin_angles(nbins)[3])) < 1.0
    with pytest.raises(ValueError, match="channels must be one of"):
        hog_glyphs(cells, 1, 3, nbins, 33, channels="max")


# ---- reconstruct -----------------------------------------------------------------------------------

@needs_fmnist
@pytest.mark.parametrize("name", list(MODELS))
def test_shown_errors_equal_the_models_stage_losses(name, tmp_path):
    """The CSV rows (the numbers the figure prints) equal the model's out.losses, per image and batch."""
    model = _model(name)
    paths = analysis.save_reconstruction(model, "fmnist:0,1,2", tmp_path, mask_seed=5, label="m")
    assert [p.name for p in paths] == ["reconstruct_m.png", "reconstruct_m.csv"]
    assert paths[0].read_bytes().startswith(PNG_SIGNATURE)
    table = pd.read_csv(paths[1])
    images = load_images("fmnist:0,1,2", model.img_size, model.cfg.in_chans).images
    mask = model.random_mask(3, torch.Generator().manual_seed(5))
    with torch.no_grad():
        whole = model(images, mask).losses
        alone = [model(images[i:i + 1], mask[i:i + 1]).losses for i in range(3)]
    assert len(table) == model.num_stages * 4
    for k in range(model.num_stages):
        rows = table[table.stage == k].set_index("index")["masked_cell_error"]
        assert rows[-1] == pytest.approx(whole[k].item(), abs=1e-5)
        for i in range(3):
            assert rows[i] == pytest.approx(alone[i][k].item(), abs=1e-5), f"stage {k} image {i}"
    assert table[table["index"] >= 0]["image"].tolist()[:3] == ["fmnist_0", "fmnist_1", "fmnist_2"]


@needs_fmnist
@pytest.mark.parametrize("name", ["vit_hog", "swin_pixels"])
def test_reconstruct_returns_each_stage_on_its_cell_grid(name):
    model = _model(name).train()
    images = load_images("fmnist:0,1", model.img_size, 1).images
    mask = model.random_mask(2, torch.Generator().manual_seed(0))
    recs = analysis.reconstruct(model, images, mask)
    assert model.training, "reconstruct must restore the model's mode"
    model.eval()
    with torch.no_grad():
        out = model(images, mask)
    assert len(recs) == model.num_stages
    for rec, tap, loss in zip(recs, model.taps, out.losses):
        assert rec.grid * rec.cell == model.img_size and rec.cell == tap.cell
        assert rec.target.shape[:2] == rec.pred.shape[:2] == rec.weight.shape == (2, rec.grid ** 2)
        assert rec.loss.item() == pytest.approx(loss.item(), abs=1e-5)
        # the weight is the token mask at this stage's grid: every masked token's cell is weighted
        assert rec.weight.sum().item() == pytest.approx(mask.float().mean().item() * 2 * rec.grid ** 2, rel=1e-6)


@needs_fmnist
@pytest.mark.parametrize("spec, chans, scales", [("fmnist:0,1", 1, [2.0, 1.0, 1.0, 0.5]),
                                                 ("skimage:astronaut,coffee", 3, [4.0, 2.0, 1.0, 0.5])])
def test_pixel_views_undo_the_per_cell_normalization(spec, chans, scales):
    """A perfect prediction brought back with each cell's own mean/variance is the input image."""
    model = isolocal.create_model("localmim_vit_nano", target="pixels", in_chans=chans, scales=scales).eval()
    images = load_images(spec, model.img_size, chans).images
    mask = model.random_mask(2, torch.Generator().manual_seed(1))
    masked = pixel_mask(model, mask)
    assert masked.mean().item() == pytest.approx(mask.float().mean().item())
    for rec in analysis.reconstruct(model, images, mask):
        perfect = dataclasses.replace(rec, pred=rec.target)
        torch.testing.assert_close(pixel_views(perfect, images, masked)["pred_stats"].float(), images,
                                   atol=1e-4, rtol=0)
        views = pixel_views(rec, images, masked)
        visible = masked.expand_as(images) == 0
        assert torch.equal(views["pred_stats"].float()[visible], images[visible])  # visible pixels pasted back
        target = unpatchify(rec.target, rec.grid, rec.cell, chans)
        assert torch.equal(views["pred"].float()[visible], target[visible])
        assert not torch.allclose(views["pred"].float()[~visible], target[~visible])  # masked: the decoder's guess


@needs_fmnist
def test_hog_prediction_panels_paste_the_visible_cells_target_glyphs():
    """Cells the encoder saw show their target glyphs; masked cells show the decoder's, on a shade."""
    model = _model("vit_hog")
    images = load_images("fmnist:0", model.img_size, 1).images
    mask = model.random_mask(1, torch.Generator().manual_seed(2))
    for rec in analysis.reconstruct(model, images, mask):
        target, pred = glyph_panels(rec, model, 0, "mean")
        side = target.shape[0] // rec.grid
        blocks = [(w, (slice(r * side, (r + 1) * side), slice(c * side, (c + 1) * side)))
                  for (r, c), w in np.ndenumerate(rec.weight[0].reshape(rec.grid, rec.grid).numpy())]
        assert all(np.array_equal(pred[b], target[b]) for w, b in blocks if w == 0)
        decoder = hog_glyphs(rec.pred[0].numpy(), rec.grid, 1, model.cfg.hog_nbins, side)[..., None]
        shade = MASK_COLOUR * 0.6
        masked = [b for w, b in blocks if w == 1]
        assert masked and all(np.allclose(pred[b], np.maximum(decoder[b], shade)) for b in masked)


# ---- command ---------------------------------------------------------------------------------------

@needs_fmnist
def test_analyze_reconstruct_command(tmp_path, capsys):
    model = _model("vit_hog")
    run_dir = tmp_path / "my_run"
    run_dir.mkdir()
    torch.save({"model": model.state_dict(), "config": to_dict(RunConfig(model=model.cfg))}, run_dir / "last.pt")
    out = tmp_path / "figs"
    assert main(["analyze", "reconstruct", "--ckpt", str(run_dir), "--images", "fmnist:3,4", "--mask-seed", "7",
                 "--out", str(out), "--pdf"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["reconstruct_my_run.csv", "reconstruct_my_run.pdf",
                                                     "reconstruct_my_run.png"]
    table = pd.read_csv(out / "reconstruct_my_run.csv")
    images = load_images("fmnist:3,4", 32, 1).images
    with torch.no_grad():
        losses = model(images, model.random_mask(2, torch.Generator().manual_seed(7))).losses
    batch = table[table["index"] == -1].sort_values("stage")["masked_cell_error"].to_numpy()
    np.testing.assert_allclose(batch, [x.item() for x in losses], atol=1e-5)
    assert set(table["run"]) == {"my_run"} and set(table["mask_seed"]) == {7}

    encoder = tmp_path / "vit.pt"
    torch.save(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32,
                                 patch_size=4, in_chans=1).state_dict(), encoder)
    resnet = isolocal.create_model("resnet32_k2")
    torch.save({"model": resnet.state_dict(), "config": to_dict(RunConfig(model=resnet.cfg))}, tmp_path / "resnet.pt")
    for argv, message in [
        (["--ckpt", str(encoder)], "holds an encoder only"),
        (["--ckpt", str(tmp_path / "resnet.pt")], "no stage has a mim head"),
        (["--ckpt", str(run_dir), "--mask-seed", "-1"], "mask seed must be an integer >= 0"),
        (["--ckpt", str(run_dir), "--images", "fmnist:x"], "not Fashion-MNIST test indices"),
    ]:
        capsys.readouterr()
        args = ["analyze", "reconstruct", "--images", "fmnist:0", "--out", str(tmp_path / "bad"), *argv]
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "bad").exists()
