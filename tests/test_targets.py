"""HOG and normalized-pixel targets (METHOD.md section 3) on hand-made images."""
import math

import pytest
import torch

from isolocal import targets


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
    a, b, c = targets.hog_bias(3, 0), targets.hog_bias(3, 0), targets.hog_bias(3, 1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.abs().max() <= 1 / 3
    img = torch.full((1, 3, 16, 16), 0.5)
    assert torch.count_nonzero(targets.hog(img, cell=8, nbins=18, bias=a)) > 0


def test_separable_gradients_equal_the_3x3_cross_correlation():
    torch.manual_seed(0)
    img = torch.randn(2, 3, 16, 16)
    k0 = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
    padded = torch.nn.functional.pad(img.reshape(6, 1, 16, 16), (1, 1, 1, 1), mode="reflect")
    g = torch.nn.functional.conv2d(padded, torch.stack([k0, k0.t()]).unsqueeze(1)).reshape(2, 3, 2, 16, 16)
    mag = g.pow(2).sum(2).sqrt()
    bins = torch.remainder(torch.floor(torch.atan2(g[:, :, 0], g[:, :, 1]) / math.pi * 9), 9).long()
    expected = torch.zeros(2, 3, 9, 16, 16).scatter_(2, bins.unsqueeze(2), mag.unsqueeze(2))
    assert torch.allclose(targets.hog_histogram(img, 9), expected, atol=1e-5)


def test_target_bank_pools_once_and_matches_direct_hog():
    torch.manual_seed(0)
    img = torch.randn(2, 3, 64, 64)
    bank = targets.TargetBank("hog", [4, 8, 16, 32], 3, 9)
    for cell, got in zip(bank.cells, bank(img)):
        assert torch.allclose(got, targets.hog(img, cell=cell, nbins=9), atol=1e-6)


def test_pixels_are_normalized_per_patch():
    torch.manual_seed(0)
    img = torch.rand(2, 3, 32, 32) * 5 + 3
    out = targets.pixels(img, patch=8)
    assert out.shape == (2, 16, 8 * 8 * 3)
    assert torch.allclose(out.mean(-1), torch.zeros(2, 16), atol=1e-5)
    assert torch.allclose(out.var(-1, unbiased=True), torch.ones(2, 16), atol=1e-3)


def test_pixels_patch_order_is_row_col_channel():
    img = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4)
    raw = torch.einsum("nchpwq->nhwpqc", img.reshape(1, 2, 2, 2, 2, 2)).reshape(1, 4, 8)
    expected = (raw - raw.mean(-1, keepdim=True)) / (raw.var(-1, keepdim=True) + 1e-6).sqrt()
    assert torch.allclose(targets.pixels(img, patch=2), expected)
    assert math.isclose(raw[0, 0, 1].item(), 16.0)  # second entry of patch 0 is channel 1


def test_bad_cell_is_a_clear_error():
    with pytest.raises(ValueError, match="cell size 5"):
        targets.hog(torch.zeros(1, 1, 32, 32), cell=5)
