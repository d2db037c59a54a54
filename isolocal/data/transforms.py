"""The pre-training augmentation and the eval resize, to normalized float tensors, and the datasets'
normalisation statistics."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torchvision.transforms.v2 as T
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import tv_tensors

FASHION_MNIST_MEAN: tuple[float, ...] = (0.2860,)
FASHION_MNIST_STD: tuple[float, ...] = (0.3530,)
IMAGENET_MEAN: tuple[float, ...] = tuple(IMAGENET_DEFAULT_MEAN)
IMAGENET_STD: tuple[float, ...] = tuple(IMAGENET_DEFAULT_STD)


class _MatchChannels:
    """Bring a uint8 image tensor to ``in_chans``: replicate gray to RGB, or take RGB luminance."""

    def __init__(self, in_chans: int) -> None:
        self.in_chans = in_chans

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        c = img.shape[-3]
        if c == self.in_chans:
            return img
        if c == 1:
            return tv_tensors.Image(img.expand(*img.shape[:-3], self.in_chans, *img.shape[-2:]).clone())
        if c == 3 and self.in_chans == 1:
            return tv_tensors.Image(T.functional.rgb_to_grayscale(img, num_output_channels=1))
        raise ValueError(f"cannot convert a {c}-channel image to in_chans={self.in_chans}")


def per_channel(values: Sequence[float], in_chans: int, what: str) -> tuple[float, ...]:
    """One value per channel: a single value is broadcast to `in_chans`."""
    values = tuple(float(v) for v in values)
    if len(values) == 1:
        return values * in_chans
    if len(values) != in_chans:
        raise ValueError(f"{what} has {len(values)} values but in_chans={in_chans}")
    return values


def build_transform(
    img_size: int,
    in_chans: int,
    mean: Sequence[float],
    std: Sequence[float],
    train: bool,
    scale: tuple[float, float] = (0.2, 1.0),
    pad: int = 0,
) -> T.Compose:
    """The LocalMIM pre-training augmentation (train) or a plain resize (eval), to normalized floats.

    Train: RandomResizedCrop(img_size, scale, bicubic, antialias) + horizontal flip, as in docs/method.md
    §7. Eval: bicubic Resize(img_size) + CenterCrop(img_size). Both accept PIL images and uint8
    tensors ``(C, H, W)`` (e.g. Fashion-MNIST's ``(1, 28, 28)``), first bringing them to ``in_chans``
    (gray is replicated to 3 channels, RGB becomes luminance for 1), and end with
    ``ToDtype(float32, scale=True)`` + Normalize, returning a plain float tensor.
    ``mean``/``std`` of length 1 are broadcast to ``in_chans``. ``pad`` > 0 first adds that many zero
    (black) pixels on every side, as CIFAR-style models read Fashion-MNIST (28 + 2 * 2 = 32 px).

    The random draws come from torch's global RNG. Inside a DataLoader worker that RNG is seeded from
    the loader's generator; in-process, ``build_loader`` gives the transforms their own seeded RNG
    stream. Either way the crops and flips are a function of the loader's seed.
    """
    mean = per_channel(mean, in_chans, "mean")
    std = per_channel(std, in_chans, "std")
    bicubic = T.InterpolationMode.BICUBIC
    if train:
        geometry = [
            T.RandomResizedCrop(img_size, scale=scale, interpolation=bicubic, antialias=True),
            T.RandomHorizontalFlip(),
        ]
    else:
        geometry = [T.Resize(img_size, interpolation=bicubic, antialias=True), T.CenterCrop(img_size)]
    return T.Compose([
        T.ToImage(),
        _MatchChannels(in_chans),
        *([T.Pad(pad)] if pad else []),
        *geometry,
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(mean, std),
        T.ToPureTensor(),
    ])
