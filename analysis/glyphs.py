"""HOG glyphs: each cell's gradient histogram drawn as one line per orientation bin.

A bin's line runs through the cell centre along the *edge* orientation of that bin (the normal of
the gradient it counts), so the glyphs trace the image's contours, as scikit-image's HOG
visualisation does. Its length is the bin's value times the cell width (L2-normalized HOG values
lie in [0, 1], so a bin holding all the energy spans the cell); lines are symmetric about the
cell's middle pixel, so their end points snap to whole pixels together.

Angle convention (checked against ``isolocal.core.targets`` by the tests): ``hog_histogram`` bins the
phase ``atan2(g0, g1)`` of the horizontal (g0) and vertical (g1) derivatives over [0, pi), and the
edge of bin ``b`` lies at ``bin_angles(nbins)[b] = (b + 1/2) pi / nbins`` counter-clockwise from the
image's x axis as displayed (rows grow downwards): bin 0 holds horizontal edges, bin nbins/2
vertical ones.
"""

from __future__ import annotations

import numpy as np
from skimage.draw import line_aa

CHANNEL_MODES = ("mean", "rgb")


def bin_angles(nbins: int) -> np.ndarray:
    """Edge orientation of each bin's centre, radians counter-clockwise from the displayed x axis."""
    return (np.arange(nbins) + 0.5) * np.pi / nbins


def draw_glyphs(hist: np.ndarray, cell_px: int) -> np.ndarray:
    """(h, w, nbins) histograms -> an (h * cell_px, w * cell_px) image in [0, 1] of anti-aliased lines.

    Values are clipped to [0, 1] (predictions may leave that range); zero bins draw nothing.
    """
    h, w, nbins = hist.shape
    out = np.zeros((h * cell_px, w * cell_px))
    angles = bin_angles(nbins)
    dr, dc = -np.sin(angles), np.cos(angles)  # unit edge direction in (row, col), rows downwards
    values = np.clip(hist, 0.0, 1.0)
    reach = (cell_px - 1) // 2  # half-length of a full line, centred on the cell's (upper-left) middle pixel
    for i, j, b in zip(*np.nonzero(values)):
        r, c = i * cell_px + reach, j * cell_px + reach
        off_r, off_c = np.rint(np.array([dr[b], dc[b]]) * values[i, j, b] * reach).astype(int)
        rr, cc, val = line_aa(r - off_r, c - off_c, r + off_r, c + off_c)
        inside = (rr >= 0) & (rr < out.shape[0]) & (cc >= 0) & (cc < out.shape[1])
        rr, cc, val = rr[inside], cc[inside], val[inside]
        out[rr, cc] = np.maximum(out[rr, cc], val)
    return out


def hog_glyphs(cells: np.ndarray, grid: int, in_chans: int, nbins: int, cell_px: int,
               channels: str = "mean") -> np.ndarray:
    """One image's HOG cells (grid*grid, in_chans*nbins), row-major as ``isolocal.core.targets.hog``
    lays them out, as glyphs: (H, W) averaged over channels, or (H, W, 3) one colour per channel."""
    if channels not in CHANNEL_MODES:
        raise ValueError(f"channels must be one of {CHANNEL_MODES}, got {channels!r}")
    hist = np.asarray(cells, dtype=np.float64).reshape(grid, grid, in_chans, nbins)
    if channels == "mean" or in_chans == 1:
        return draw_glyphs(hist.mean(axis=2), cell_px)
    if in_chans != 3:
        raise ValueError(f"per-channel glyphs need 3 colour channels, got {in_chans}")
    return np.stack([draw_glyphs(hist[:, :, c], cell_px) for c in range(3)], axis=-1)
