"""HOG and normalized-pixel targets (docs/method.md §3) on hand-made images."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from isolocal.core import targets


def edge_image(direction: str, polarity: int, size: int = 32, chans: int = 1) -> torch.Tensor:
    img = torch.zeros(1, chans, size, size)
    if direction == "vertical":  # intensity changes along x
        img[..., :, size // 2:] = 1.0
    else:  # horizontal edge: intensity changes along y
        img[..., size // 2:, :] = 1.0
    return img * polarity


def dominant_bins(hist: torch.Tensor) -> set[int]:
    """Bins holding any magnitude in a per-pixel histogram (B, C, nbins, H, W)."""
    return set(torch.nonzero(hist.sum(dim=(0, 1, 3, 4)) > 0).flatten().tolist())


@pytest.mark.parametrize("polarity", [1, -1])
def test_vertical_edge_lands_in_bin_4(polarity):
    hist = targets.hog_histogram(edge_image("vertical", polarity), nbins=9)
    assert dominant_bins(hist) == {4}


@pytest.mark.parametrize("polarity", [1, -1])
def test_horizontal_edge_lands_in_bin_0(polarity):
    hist = targets.hog_histogram(edge_image("horizontal", polarity), nbins=9)
    assert dominant_bins(hist) == {0}


def test_flat_image_gives_zeros():
    out = targets.hog(torch.full((2, 3, 32, 32), 0.7), cell=8, nbins=9)
    assert out.shape == (2, 16, 27)
    assert torch.count_nonzero(out) == 0


def test_cells_have_unit_norm_per_channel():
    torch.manual_seed(0)
    img = torch.randn(2, 3, 32, 32)
    img[:, 1, :9, :9] = 0.0  # one flat cell (and its neighbours) in the green channel stays zero
    out = targets.hog(img, cell=8, nbins=9).reshape(2, 16, 3, 9)
    norms = out.norm(dim=-1)
    flat = torch.zeros_like(norms, dtype=torch.bool)
    flat[:, 0, 1] = True
    assert torch.allclose(norms[~flat], torch.ones_like(norms[~flat]), atol=1e-5)
    assert torch.all(norms[flat] == 0)


def test_hog_layout_is_row_major_and_channel_concatenated():
    img = torch.zeros(1, 3, 32, 32)
    img[0, 2, :16, 16:] = 0.0
    img[0, 2, :, 24:] = 1.0  # vertical edge in the blue channel, right column of cells only
    out = targets.hog(img, cell=16, nbins=9).reshape(1, 2, 2, 3, 9)
    assert out[0, :, 0].abs().sum() == 0  # left cells: nothing
    assert out[0, :, 1, 2, 4].min() > 0.99  # right cells: blue bin 4
    assert out[0, :, 1, :2].abs().sum() == 0  # red and green: nothing


def test_hog_bias_is_seeded_and_changes_the_target():
    a, b, c = targets.hog_bias(4, 0), targets.hog_bias(4, 0), targets.hog_bias(4, 1)
    assert a.shape == (4, 2) and torch.equal(a, b) and not torch.equal(a, c)
    many = targets.hog_bias(2000, 0)  # PyTorch's conv-bias init for a 3x3 kernel: U(-1/3, 1/3)
    assert many.abs().max() <= 1 / 3 and many.min() < -0.33 and many.max() > 0.33
    assert abs(many.mean().item()) < 0.01
    img = torch.full((1, 3, 16, 16), 0.5)
    assert torch.count_nonzero(targets.hog(img, cell=8, nbins=18, bias=a[0])) > 0


def test_target_bank_offsets_one_per_stage_shared_by_the_colour_channels():
    """The published code runs R, G and B through one HOG layer per stage, its conv bias the (g0, g1)
    offset: one offset per stage (here from the config's default seed, 0), the same for every channel,
    so three equal channels give three equal histograms."""
    bank = targets.TargetBank("hog", [4, 8, 8], 18, bias=True)
    assert torch.equal(bank.bias, targets.hog_bias(3, 0)) and len(bank.bias.unique(dim=0)) == 3
    torch.manual_seed(0)
    gray = torch.randn(2, 1, 16, 16)
    for k, got in enumerate(bank(gray.expand(-1, 3, -1, -1))):
        assert torch.equal(got, targets.hog(gray, bank.cells[k], 18, bank.bias[k]).repeat(1, 1, 3)), k
    rgb = torch.randn(2, 3, 16, 16)
    second, third = bank(rgb)[1:]  # same cell size, another stage's offset: another target
    assert not torch.allclose(second, third)
    with pytest.raises(ValueError, match=r"one \(g0, g1\) offset of shape \(2,\), got shape \(3, 2\)"):
        targets.hog(rgb, 8, 18, torch.zeros(3, 2))


def test_target_bank_offsets_are_not_saved_and_old_saved_ones_are_ignored():
    """The offsets are a function of the config; checkpoints from before they were drawn per stage
    saved one per colour channel under `bias`, and those still load (the rebuilt offsets stay)."""
    bank = targets.TargetBank("hog", [4, 8], 18, bias=True)
    assert "bias" not in bank.state_dict()
    bank.load_state_dict({"bias": torch.zeros(3, 2)})
    assert torch.equal(bank.bias, targets.hog_bias(2, 0))


SOBEL_K0 = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]], dtype=torch.float64)
SOBEL = torch.stack([SOBEL_K0, SOBEL_K0.t()]).unsqueeze(1)  # the published HOG layer's conv weight (2, 1, 3, 3)


def test_target_bank_takes_given_offsets_of_its_shape_only():
    bank = targets.TargetBank("hog", [4, 8], 18, bias=True)
    given = torch.tensor([[0.1, -0.2], [0.3, 0.0]])
    bank.use_offsets(given)
    img = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(bank(img)[1], targets.hog(img, 8, 18, given[1]))
    with pytest.raises(ValueError, match=r"HOG offsets must have shape \(2, 2\).*got \(3, 2\)"):
        bank.use_offsets(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="model.hog_bias is false"):
        targets.TargetBank("hog", [4, 8], 18).use_offsets(given)


def reference_hog(images: torch.Tensor, cell: int, nbins: int, bias: torch.Tensor | None) -> np.ndarray:
    """HOG written out independently: `conv2d` with the two 3x3 Sobel kernels and their bias, one
    (g0, g1) for every channel (as the published code's frozen nn.Conv2d), unsigned orientation in
    degrees binned in 180/nbins steps, a per-cell loop averaging the histograms, then L2 normalization
    per cell and channel."""
    B, C, H, W = images.shape
    out = np.zeros((B, (H // cell) * (W // cell), C * nbins))
    for c in range(C):
        x = F.pad(images[:, c:c + 1].double(), (1, 1, 1, 1), mode="reflect")
        g = F.conv2d(x, SOBEL, None if bias is None else bias.double()).numpy()  # (B, 2, H, W)
        magnitude = np.hypot(g[:, 0], g[:, 1])
        degrees = np.degrees(np.arctan2(g[:, 0], g[:, 1])) % 180.0
        bins = np.minimum((degrees // (180.0 / nbins)).astype(int), nbins - 1)
        for b in range(B):
            for i in range(H // cell):
                for j in range(W // cell):
                    hist = np.zeros(nbins)
                    window = (slice(i * cell, (i + 1) * cell), slice(j * cell, (j + 1) * cell))
                    np.add.at(hist, bins[b][window].ravel(), magnitude[b][window].ravel())
                    hist /= cell * cell
                    out[b, i * (W // cell) + j, c * nbins:(c + 1) * nbins] = hist / max(np.linalg.norm(hist), 1e-12)
    return out


@pytest.mark.parametrize("nbins, with_bias", [(9, False), (18, True)])
def test_hog_matches_a_conv2d_reference_with_bias(nbins, with_bias):
    torch.manual_seed(0)
    img = torch.randn(2, 3, 16, 16)
    img[:, :, :4, :4] = 0.3  # a flat corner: without the bias its gradients are exactly zero
    bias = torch.tensor([0.3, -0.1]) if with_bias else None
    got = targets.hog(img, cell=4, nbins=nbins, bias=bias).numpy()
    np.testing.assert_allclose(got, reference_hog(img, 4, nbins, bias), rtol=1e-4, atol=1e-5)


def test_hog_kernels_are_the_reference_conv_weight():
    """`hog_kernels` is what a published HOG layer must hold for its targets to be isolocal's (the conv
    weight of `reference_hog`, which `hog` matches); a published checkpoint's layers are checked against it."""
    assert torch.equal(targets.hog_kernels().double(), SOBEL)


def diagonal_image(size: int = 16) -> torch.Tensor:
    """Bright above the main diagonal: I[y, x] = 1 where x > y."""
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return (x > y).float().view(1, 1, size, size)


def test_diagonal_edge_lands_in_bin_6_with_hand_derived_magnitudes():
    """For I = [x > y], the 3x3 sums give g0 = (left - right) = -3 and g1 = (top - bottom) = +3 on the
    diagonal and the first super-diagonal, -1 and +1 one further out on each side, 0 elsewhere. The
    orientation atan2(-3, 3) = -45 deg is 135 deg unsigned, in [120, 140): bin 6 of 9."""
    hist = targets.hog_histogram(diagonal_image(), nbins=9)[0, 0, :, 2:-2, 2:-2]  # away from the padding
    y, x = torch.meshgrid(torch.arange(2, 14), torch.arange(2, 14), indexing="ij")
    offset = x - y
    expected = torch.zeros(12, 12)
    expected[(offset == 0) | (offset == 1)] = 3 * math.sqrt(2)
    expected[(offset == -1) | (offset == 2)] = math.sqrt(2)
    assert torch.allclose(hist[6], expected, atol=1e-5)
    assert torch.count_nonzero(hist[torch.arange(9) != 6]) == 0


def test_anti_diagonal_edge_lands_in_bin_2_and_the_bias_shifts_it():
    """The mirror image, bright where x + y > 15, gives g = (-3, -3): atan2 = -135 deg, 45 deg unsigned,
    bin 2 of 9. Adding a bias (+6, 0) to g gives (3, -3) on those pixels: 135 deg, bin 6; subtracting
    it would give (-9, -3): -108.4 deg, 71.6 deg unsigned, bin 3."""
    img = diagonal_image().flip(-2)  # I[y, x] = [x + y > 15]
    hist = targets.hog_histogram(img, nbins=9)[0, 0, :, 2:-2, 2:-2]
    assert torch.count_nonzero(hist[torch.arange(9) != 2]) == 0 and hist[2].max() == pytest.approx(3 * math.sqrt(2))
    biased = targets.hog_histogram(img, nbins=9, bias=torch.tensor([6.0, 0.0]))[0, 0, :, 2:-2, 2:-2]
    strong = hist[2] > 4  # the pixels with g = (-3, -3)
    assert torch.allclose(biased[6][strong], torch.full_like(biased[6][strong], 3 * math.sqrt(2)))
    assert torch.count_nonzero(biased[3]) == 0


def test_target_bank_pools_once_and_matches_direct_hog():
    torch.manual_seed(0)
    img = torch.randn(2, 3, 64, 64)
    bank = targets.TargetBank("hog", [4, 8, 16, 32], 9)
    for cell, got in zip(bank.cells, bank(img)):
        assert torch.allclose(got, targets.hog(img, cell=cell, nbins=9), atol=1e-6)


def test_pixels_are_normalized_per_patch():
    torch.manual_seed(0)
    img = torch.rand(2, 3, 32, 32) * 5 + 3
    out = targets.pixels(img, patch=8)
    assert out.shape == (2, 16, 8 * 8 * 3)
    assert torch.allclose(out.mean(-1), torch.zeros(2, 16), atol=1e-5)
    assert torch.allclose(out.var(-1, unbiased=True), torch.ones(2, 16), atol=1e-3)


def test_pixels_match_a_per_patch_loop():
    """Each patch (row-major), flattened as (row, col, channel), minus its mean, over the square root
    of its unbiased variance + 1e-6 (MAE's norm_pix_loss)."""
    torch.manual_seed(0)
    img = torch.rand(2, 3, 12, 8) * 4 - 1
    img[1, :, :4, :4] = 2.0  # a constant patch: its normalized pixels are 0, not NaN
    patch = 4
    expected = np.zeros((2, 3 * 2, patch * patch * 3))
    for b in range(2):
        for i in range(3):
            for j in range(2):
                values = img[b, :, i * patch:(i + 1) * patch, j * patch:(j + 1) * patch].permute(1, 2, 0)
                values = values.double().numpy().ravel()
                expected[b, i * 2 + j] = (values - values.mean()) / np.sqrt(values.var(ddof=1) + 1e-6)
    np.testing.assert_allclose(targets.pixels(img, patch=patch).numpy(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape, cell", [((32, 32), 5), ((32, 20), 8), ((20, 32), 8), ((32, 32), 0)])
def test_bad_cell_is_a_clear_error(shape, cell):
    for fn in (targets.hog, targets.pixels):
        with pytest.raises(ValueError, match=f"cell size {cell} must be >= 1 and divide the image size"):
            fn(torch.zeros(1, 1, *shape), cell)


def test_defaults_are_16_px_cells_and_9_bins():
    img = torch.rand(2, 3, 32, 32)
    assert targets.hog_histogram(img).shape == (2, 3, 9, 32, 32)
    assert targets.hog(img).shape == (2, 4, 27)
    assert targets.pixels(img).shape == (2, 4, 16 * 16 * 3)


def test_targets_are_fp32_whatever_the_image_dtype():
    """bf16 images (a bf16 pipeline) give fp32 targets computed in fp32 from the bf16 values."""
    img = torch.rand(2, 3, 16, 16).bfloat16()
    for fn in (lambda x: targets.hog(x, 8), lambda x: targets.pixels(x, 8)):
        out = fn(img)
        assert out.dtype == torch.float32
        assert torch.equal(out, fn(img.float()))


def test_target_bank_with_cells_that_do_not_nest():
    """Cell 3 is not a multiple of the finest cell (2), so it cannot be pooled from the finest cells:
    every target still equals the direct computation."""
    torch.manual_seed(0)
    img = torch.randn(2, 3, 12, 12)
    bank = targets.TargetBank("hog", [2, 3, 4, 6], 9)
    for cell, got in zip(bank.cells, bank(img)):
        assert torch.allclose(got, targets.hog(img, cell=cell, nbins=9), atol=1e-6), cell
