"""Reconstruction targets: HOG and normalized pixels at any cell size (docs/method.md §3).

Both return (B, cells, dim) with cells in row-major order, which is the layout every decoder
predicts. `TargetBank` computes all of a model's targets for one batch at once: the HOG gradient
histogram is built once at pixel level and pooled to every tap's cell size (pooling nests exactly
because every cell size is a multiple of the smallest one), unless each tap has its own gradient
offset (`hog_bias`), which gives each tap its own histogram. Targets are always fp32: every entry
point turns autocast off on the images' device (CUDA autocast runs einsum in bf16, and a target
rounded to bf16 is another target).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def hog_bias(stages: int, seed: int) -> Tensor:
    """The frozen (g0, g1) offset of every stage's HOG target, shape (stages, 2); a stage's offset is
    added to the gradients of every colour channel.

    The published code gives each stage its own HOG layer, a 3x3 convolution whose bias (g0, g1) it
    leaves at PyTorch's default init, U(-1/3, 1/3) for a single-channel 3x3 kernel, drawn from the global
    RNG, and runs R, G and B through that one layer; here the offsets are drawn from an explicit seed.
    """
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(stages, 2, generator=g) * 2 - 1) / 3.0


def hog_kernels() -> Tensor:
    """(2, 1, 3, 3): the g0 and g1 kernels as one convolution's weight (cross-correlation), the form a
    published HOG layer stores; `hog_histogram` applies the same kernels separably."""
    k0 = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
    return torch.stack([k0, k0.T]).unsqueeze(1)


def fp32(images: Tensor) -> torch.autocast:
    """Autocast off on the images' device: targets are computed in fp32 inside a bf16 training step."""
    return torch.autocast(images.device.type, enabled=False)


def hog_histogram(images: Tensor, nbins: int = 9, bias: Tensor | None = None) -> Tensor:
    """Per-pixel hard-binned gradient histogram, (B, C, nbins, H, W), fp32; `bias`, one (g0, g1) offset
    of shape (2,), is added to the gradients of every channel."""
    if bias is not None and tuple(bias.shape) != (2,):
        raise ValueError(f"bias must be one (g0, g1) offset of shape (2,), got shape {tuple(bias.shape)}")
    with fp32(images):
        B, C, H, W = images.shape
        x = F.pad(images.float().reshape(B * C, 1, H, W), (1, 1, 1, 1), mode="reflect").squeeze(1)
        # The 3x3 kernels k0 = [[1,0,-1],[2,0,-2],[1,0,-1]] and k1 = k0^T, applied separably: a central
        # difference, then [1, 2, 1] smoothing across it. Same values, and exactly zero on flat regions.
        dx = x[:, :, :-2] - x[:, :, 2:]  # left - right
        dy = x[:, :-2, :] - x[:, 2:, :]  # top - bottom
        g0 = dx[:, :-2] + 2 * dx[:, 1:-1] + dx[:, 2:]
        g1 = dy[:, :, :-2] + 2 * dy[:, :, 1:-1] + dy[:, :, 2:]
        g = torch.stack([g0, g1], dim=1).reshape(B, C, 2, H, W)
        if bias is not None:
            g = g + bias.to(g.device).reshape(1, 1, 2, 1, 1)
        g0, g1 = g[:, :, 0], g[:, :, 1]
        magnitude = torch.sqrt(g0 * g0 + g1 * g1)
        phase = torch.atan2(g0, g1)
        bins = torch.remainder(torch.floor(phase / math.pi * nbins), nbins).long()
        hist = torch.zeros(B, C, nbins, H, W, device=images.device, dtype=torch.float32)
        return hist.scatter_(2, bins.unsqueeze(2), magnitude.unsqueeze(2))


def pool_histogram(hist: Tensor, cell: int) -> Tensor:
    """Average-pool a (B, C, nbins, H, W) histogram over cell x cell pixels (unnormalized)."""
    B, C, n, H, W = hist.shape
    pooled = F.avg_pool2d(hist.reshape(B, C * n, H, W), cell, cell)
    return pooled.reshape(B, C, n, H // cell, W // cell)


def finish_hog(pooled: Tensor) -> Tensor:
    """L2-normalize each cell's bins per channel and flatten to (B, cells, C*nbins)."""
    B, C, n, h, w = pooled.shape
    normed = F.normalize(pooled, p=2, dim=2, eps=1e-12)
    return normed.permute(0, 3, 4, 1, 2).reshape(B, h * w, C * n)


def hog(images: Tensor, cell: int = 16, nbins: int = 9, bias: Tensor | None = None) -> Tensor:
    """HOG target of docs/method.md §3: (B, (H/cell)*(W/cell), C*nbins), [R bins, G bins, B bins]."""
    _check_cell(images, cell)
    with torch.no_grad(), fp32(images):
        return finish_hog(pool_histogram(hog_histogram(images, nbins, bias), cell))


def pixels(images: Tensor, patch: int = 16) -> Tensor:
    """Per-patch normalized pixels: (B, cells, patch*patch*C), each patch flattened (row, col, channel)."""
    _check_cell(images, patch)
    with torch.no_grad(), fp32(images):
        B, C, H, W = images.shape
        h, w = H // patch, W // patch
        x = images.float().reshape(B, C, h, patch, w, patch)
        x = torch.einsum("nchpwq->nhwpqc", x).reshape(B, h * w, patch * patch * C)
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True)  # unbiased, as MAE
        return (x - mean) / (var + 1e-6).sqrt()


def _check_cell(images: Tensor, cell: int) -> None:
    if images.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    H, W = images.shape[-2:]
    if cell < 1 or H % cell or W % cell:
        raise ValueError(f"cell size {cell} must be >= 1 and divide the image size {H}x{W}")


def target_dim(kind: str, cell: int, in_chans: int, nbins: int) -> int:
    """Feature size of one target cell."""
    return in_chans * nbins if kind == "hog" else cell * cell * in_chans


def _drop_saved_bias(module: nn.Module, state_dict: dict, prefix: str, *args: object) -> None:
    """Checkpoints from before the offsets were drawn per stage saved them (one per colour channel);
    they are rebuilt from the config now, so the saved ones are not loaded."""
    state_dict.pop(prefix + "bias", None)


class TargetBank(nn.Module):
    """All of a model's targets for one batch, one tensor per tap, computed without gradients in fp32.

    With `bias`, tap k's HOG has its own offset `bias[k]` (drawn from `bias_seed`), so each tap gets its
    own histogram; without it the histogram is built once and pooled to every cell size. The offsets
    are a function of the config and are not saved with the weights."""

    def __init__(self, kind: str, cells: list[int], nbins: int, bias: bool = False, bias_seed: int = 0):
        super().__init__()
        if kind not in ("hog", "pixels"):
            raise ValueError(f"target must be 'hog' or 'pixels', got {kind!r}")
        self.kind, self.cells, self.nbins = kind, list(cells), nbins
        offsets = hog_bias(len(self.cells), bias_seed) if bias and kind == "hog" else None
        self.register_buffer("bias", offsets, persistent=False)
        self.register_load_state_dict_pre_hook(_drop_saved_bias)

    @torch.no_grad()
    def use_offsets(self, offsets: Tensor) -> None:
        """Replace the seeded offsets with given ones, one (g0, g1) per tap: a published checkpoint's HOG
        layers hold the offsets its decoders were trained against. Not saved with the weights."""
        if self.bias is None:
            raise ValueError("HOG offsets given to a target bank without them (model.hog_bias is false or the "
                             "target is not 'hog')")
        if tuple(offsets.shape) != tuple(self.bias.shape):
            raise ValueError(f"HOG offsets must have shape {tuple(self.bias.shape)} (one (g0, g1) per tap), "
                             f"got {tuple(offsets.shape)}")
        self.bias.copy_(offsets)

    @torch.no_grad()
    def forward(self, images: Tensor, which: Sequence[int] | None = None) -> list[Tensor | None]:
        """One target per tap; with `which`, only those taps' (None for the others: a pipeline rank
        needs its own stages' targets only). The pooling path is the same for any `which`, so every
        target is bit-identical to the one a full call computes."""
        wanted = range(len(self.cells)) if which is None else which
        if not wanted:  # no stage here reconstructs (its heads are not `mim`)
            return [None] * len(self.cells)
        if self.kind == "pixels":
            return [pixels(images, c) if k in wanted else None for k, c in enumerate(self.cells)]
        if self.bias is not None:
            return [hog(images, c, self.nbins, self.bias[k]) if k in wanted else None for k, c in enumerate(self.cells)]
        with fp32(images):
            hist = hog_histogram(images, self.nbins)
            finest = min(self.cells)
            base = pool_histogram(hist, finest)
            return [None if k not in wanted else
                    finish_hog(pool_histogram(base, c // finest) if c % finest == 0 else pool_histogram(hist, c))
                    for k, c in enumerate(self.cells)]
