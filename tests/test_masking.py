"""Masks from explicit generators and their re-gridding to every decoder scale."""
import numpy as np
import pytest
import torch

from isolocal.core.masking import random_mask, regrid, visible_count, visible_indices


def test_same_seed_same_mask_and_keep_count():
    a = random_mask(4, 14, 0.75, torch.Generator().manual_seed(3))
    b = random_mask(4, 14, 0.75, torch.Generator().manual_seed(3))
    c = random_mask(4, 14, 0.75, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert ((~a).sum(1) == int(196 * 0.25)).all()
    assert not torch.equal(a[0], a[1])  # per-image masks differ


def test_per_batch_mask_and_units():
    m = random_mask(3, 56, 0.75, torch.Generator().manual_seed(0), unit=8, per_batch=True)
    assert torch.equal(m[0], m[1]) and torch.equal(m[1], m[2])
    assert m.is_contiguous()  # rows are copies, not views of one row: a caller may edit one in place
    units = m[0].reshape(7, 8, 7, 8)
    assert (units.all(dim=(1, 3)) | (~units).all(dim=(1, 3))).all()  # units are all-or-nothing
    assert int((~units[:, 0, :, 0]).sum()) == int(49 * 0.25)


@pytest.mark.parametrize("scale", [4, 2, 1])
def test_regrid_replicates_for_finer_grids(scale):
    m = random_mask(2, 4, 0.5, torch.Generator().manual_seed(0))
    r = regrid(m, 4, scale).reshape(2, 4 * scale, 4 * scale)
    expected = np.kron(m.reshape(2, 4, 4).numpy(), np.ones((1, scale, scale)))  # each token a scale x scale block
    assert np.array_equal(r.numpy(), expected)


@pytest.mark.parametrize("scale", [0.5, 0.25])
def test_regrid_means_for_coarser_grids(scale):
    m = random_mask(2, 8, 0.5, torch.Generator().manual_seed(0))
    k = int(1 / scale)
    r = regrid(m, 8, scale).reshape(2, 8 // k, 8 // k)
    grid = m.float().reshape(2, 8, 8)
    assert r[1, 0, 0] == grid[1, :k, :k].mean()
    assert torch.allclose(r.mean(dim=(1, 2)), grid.mean(dim=(1, 2)))


def test_visible_indices_round_trip():
    m = random_mask(3, 6, 0.5, torch.Generator().manual_seed(1))
    keep, restore = visible_indices(m)
    assert keep.shape == (3, 18)
    assert (~torch.gather(m, 1, keep)).all()
    assert (keep.diff(dim=1) > 0).all()  # raster order
    tokens = torch.arange(36).expand(3, -1)
    order = torch.cat([keep, torch.argsort(m.to(torch.uint8), dim=1, stable=True)[:, 18:]], 1)
    assert torch.equal(torch.gather(torch.gather(tokens, 1, order), 1, restore), tokens)


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5])
def test_bad_ratio(ratio):
    with pytest.raises(ValueError, match=r"mask_ratio must be in \(0, 1\), got"):
        random_mask(1, 4, ratio)


@pytest.mark.parametrize("unit", [0, 3])
def test_bad_unit(unit):
    with pytest.raises(ValueError, match=f"mask_unit {unit} must be >= 1 and divide the token grid 8"):
        random_mask(1, 8, 0.5, unit=unit)


def test_visible_count_and_a_single_visible_unit():
    assert visible_count(6, 0.75) == 9 and visible_count(56, 0.75, unit=8) == 12 * 64  # 9 of 36 tokens; 12 of 49 units
    m = random_mask(3, 2, 0.75, torch.Generator().manual_seed(0))  # 4 units, int(4 * 0.25) = 1 visible
    assert ((~m).sum(1) == 1).all()
    with pytest.raises(ValueError, match="leaves no visible unit out of 4"):
        random_mask(1, 2, 0.8)
