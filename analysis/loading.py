"""What analysis reads besides the model (`isolocal.io.load.load_model` loads every checkpoint format): the
images to analyse, the input shape they must have, and one label per checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from timm.layers import PatchEmbed
from torch import Tensor, nn
from torchvision.transforms.v2.functional import pil_to_tensor

from isolocal.config.schema import IMAGE_SPEC_HELP
from isolocal.data import (
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    FashionMNIST,
    build_transform,
)
from isolocal.models.encoder import StagewiseEncoder

# Bundled scikit-image photos (no download); gray ones are replicated for RGB models.
SKIMAGE_PHOTOS = (
    "astronaut", "brick", "camera", "cat", "chelsea", "clock", "coffee", "coins", "grass", "gravel",
    "hubble_deep_field", "immunohistochemistry", "moon", "rocket",
)


def checkpoint_labels(ckpts: Sequence[Path], labels: Sequence[str] | None) -> list[str]:
    """One unique label per checkpoint (figure legends, file names): ``labels``, default the file stems."""
    labels = list(labels or [Path(p).stem for p in ckpts])
    if len(labels) != len(ckpts):
        raise ValueError(f"got {len(labels)} --label for {len(ckpts)} --ckpt; give one label per checkpoint")
    if len(set(labels)) != len(labels):
        raise ValueError(f"labels {labels} are not unique; pass --label per checkpoint")
    return labels


def input_shape(model: nn.Module) -> tuple[int, int]:
    """(img_size, in_chans) the encoder's patch embedding was built for (an isolocal model without
    one, a ResNet: its config's)."""
    embed = next((m for m in model.modules() if isinstance(m, PatchEmbed)), None)
    if embed is None and isinstance(model, StagewiseEncoder):
        return model.cfg.img_size, model.cfg.in_chans
    if embed is None or embed.img_size is None:
        raise ValueError("model has no timm PatchEmbed with a fixed image size")
    h, w = embed.img_size
    if h != w:
        raise ValueError(f"non-square image size {(h, w)} is not supported")
    return h, embed.proj.in_channels


@dataclass(frozen=True)
class ImageBatch:
    """Normalized images (B, C, H, W), a short name per image, and the normalization used."""

    images: Tensor
    names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]


def _parse_list(spec: str, body: str) -> list[str]:
    items = [s.strip() for s in body.split(",") if s.strip()]
    if not items:
        raise ValueError(f"--images {spec!r} names no images; use {IMAGE_SPEC_HELP}")
    return items


def _raw_images(spec: str) -> list[tuple[str, Any]]:
    """(name, PIL image or uint8 (C, H, W) tensor) per image of ``spec``; all names checked first."""
    if spec.startswith("fmnist:"):
        items = _parse_list(spec, spec.removeprefix("fmnist:"))
        bad = [s for s in items if not s.isdigit()]
        if bad:
            raise ValueError(f"--images {spec!r}: {bad} are not Fashion-MNIST test indices (integers 0..9999)")
        data = FashionMNIST(train=False)
        out_of_range = [int(s) for s in items if int(s) >= len(data)]
        if out_of_range:
            raise ValueError(f"--images {spec!r}: indices {out_of_range} out of range 0..{len(data) - 1}")
        return [(f"fmnist_{s}", data[int(s)][0]) for s in items]
    if spec.startswith("skimage:"):
        import skimage.data  # heavy (scipy, imageio): only for skimage photos

        items = _parse_list(spec, spec.removeprefix("skimage:"))
        bad = [s for s in items if s not in SKIMAGE_PHOTOS]
        if bad:
            raise ValueError(f"--images {spec!r}: unknown scikit-image photos {bad}; valid: {', '.join(SKIMAGE_PHOTOS)}")
        arrays = [torch.from_numpy(getattr(skimage.data, s)()) for s in items]
        return [(s, a.permute(2, 0, 1) if a.dim() == 3 else a[None]) for s, a in zip(items, arrays)]
    folder = Path(spec)
    if not folder.is_dir():
        raise ValueError(f"--images {spec!r} is not a known image source; use {IMAGE_SPEC_HELP}")
    extensions = {e for e, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in extensions)
    if not files:
        raise ValueError(f"image folder {folder} holds no image files ({', '.join(sorted(extensions)[:6])}, ...)")
    out = []
    for file in files:
        try:
            with Image.open(file) as img:
                out.append((file.stem, pil_to_tensor(img.convert("RGB"))))
        except OSError as err:
            raise ValueError(f"cannot read image {file}: {err}") from None
    return out


def _normalization(in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) for `in_chans`: Fashion-MNIST's for 1 channel, ImageNet's for 3."""
    stats = {1: (FASHION_MNIST_MEAN, FASHION_MNIST_STD), 3: (IMAGENET_MEAN, IMAGENET_STD)}
    if in_chans not in stats:
        raise ValueError(f"in_chans must be 1 or 3 for analysis images, got {in_chans}")
    return stats[in_chans]


def check_images(spec: str, in_chans: int) -> int:
    """The number of images of `spec`, or what `load_images(spec, _, in_chans)` would raise (unknown
    source, bad index or name, unreadable file, channels), without transforming anything: a study checks
    its images before the first run."""
    _normalization(in_chans)
    return len(_raw_images(spec))


def load_images(spec: str, img_size: int, in_chans: int) -> ImageBatch:
    """Images for analysis from ``spec`` (see ``IMAGE_SPEC_HELP``), resized and center-cropped to
    ``img_size``, brought to ``in_chans`` and normalized with Fashion-MNIST statistics for
    1-channel models and ImageNet's for 3-channel ones (what those models were trained on)."""
    mean, std = _normalization(in_chans)
    transform = build_transform(img_size, in_chans, mean, std, train=False)
    raw = _raw_images(spec)
    return ImageBatch(torch.stack([transform(img) for _, img in raw]), [n for n, _ in raw], mean, std)
