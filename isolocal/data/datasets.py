"""The three image sources (Fashion-MNIST, an image folder, synthetic gratings) behind one contract, and
the dataset-level helpers: `build_dataset`, `MultiView`, `check_labels`."""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder

from isolocal.data.idx import read_idx, read_idx_header
from isolocal.data.transforms import (
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_transform,
    per_channel,
)
from isolocal.errors import DatasetError

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
FASHION_MNIST_FILES = {
    True: ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    False: ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
DATASET_NAMES = ("fashion_mnist", "folder", "synthetic")

_FASHION_MNIST_HINT = (
    "install Debian's package dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or "
    "pass data.root=<dir with train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
    "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz>"
)


class FashionMNIST(Dataset):
    """Fashion-MNIST from its four IDX files; items are ``(transform(uint8 (1, 28, 28)), int)``.

    All four files are checked (existence, header, matching counts) before anything is decompressed,
    so a broken install fails at once with the file's name rather than minutes into a run. The raw
    uint8 array stays in memory (47 MB for train) and is shared copy-on-write with forked workers.
    Without a transform the item is the raw uint8 tensor.

    A `deterministic` transform (the eval resize, no random draw) runs on a loader's whole batch at
    once (`__getitems__`): the same values as one image at a time, 20-40x faster, which is most of
    what reading the evaluation splits used to cost.
    """

    classes = FASHION_MNIST_CLASSES

    def __init__(
        self,
        root: str | os.PathLike = FASHION_MNIST_ROOT,
        train: bool = True,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        deterministic: bool = False,
    ) -> None:
        self.root = os.fspath(root)
        self.train = train
        self.transform = transform
        self.deterministic = deterministic
        self._validate()
        images_file, labels_file = FASHION_MNIST_FILES[train]
        self.images = read_idx(os.path.join(self.root, images_file))
        self.targets = read_idx(os.path.join(self.root, labels_file)).astype(np.int64)

    def _validate(self) -> None:
        if not os.path.isdir(self.root):
            raise DatasetError(f"Fashion-MNIST directory {self.root} does not exist; {_FASHION_MNIST_HINT}")
        files = [f for pair in FASHION_MNIST_FILES.values() for f in pair]
        missing = [f for f in files if not os.path.isfile(os.path.join(self.root, f))]
        if missing:
            raise DatasetError(
                f"Fashion-MNIST directory {self.root} lacks {', '.join(missing)}; {_FASHION_MNIST_HINT}"
            )
        for images_file, labels_file in FASHION_MNIST_FILES.values():
            ipath, lpath = os.path.join(self.root, images_file), os.path.join(self.root, labels_file)
            idtype, ishape = read_idx_header(ipath)
            ldtype, lshape = read_idx_header(lpath)
            if idtype != np.uint8 or len(ishape) != 3 or ishape[1:] != (28, 28):
                raise DatasetError(
                    f"{ipath}: expected uint8 images (N, 28, 28), header says {idtype.name} {ishape}"
                )
            if ldtype != np.uint8 or len(lshape) != 1:
                raise DatasetError(f"{lpath}: expected uint8 labels (N,), header says {ldtype.name} {lshape}")
            if ishape[0] != lshape[0]:
                raise DatasetError(f"{ipath} holds {ishape[0]} images but {lpath} holds {lshape[0]} labels")

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = torch.from_numpy(self.images[index]).unsqueeze(0)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        """A loader's batch: transformed at once when the transform is deterministic, else item by item
        (a random transform's draws stay in item order)."""
        if self.transform is None or not self.deterministic:
            return [self[i] for i in indices]
        images = self.transform(torch.from_numpy(self.images[indices]).unsqueeze(1))
        return list(zip(images, self.targets[indices].tolist()))


def _load_image(path: str) -> Image.Image:
    """ImageFolder's loader, but a broken file raises DatasetError naming it."""
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DatasetError(f"cannot read image {path}: {e}") from e


class ImageFolderDataset(ImageFolder):
    """``root/<class>/<image>`` (torchvision's ImageFolder) with errors that name the bad path.

    Images are loaded as RGB PIL images; ``build_transform`` converts them to ``in_chans``. Files are
    only opened when indexed (validating ImageNet up front would take far too long), so a corrupt
    file surfaces as a ``DatasetError`` from the loader, naming that file.
    """

    def __init__(
        self, root: str | os.PathLike, transform: Callable[[Any], torch.Tensor] | None = None
    ) -> None:
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise DatasetError(f"image folder {root} does not exist")
        try:
            super().__init__(root, transform=transform, loader=_load_image)
        except FileNotFoundError as e:  # no class folders, or no images with a known extension
            raise DatasetError(f"image folder {root}: {e}") from e


class SyntheticImages(Dataset):
    """Deterministic class-dependent gratings: no files needed, and features can beat chance on them.

    Class ``c`` sets the grating orientation (``c * pi / num_classes``) and its spatial frequency
    (2, 3.5 or 5 cycles per image by ``c % 3``); each image adds a random phase, a small orientation
    jitter, a bright Gaussian blob at a random spot and pixel noise. Item ``i`` is drawn from a
    generator keyed by ``(seed, train, i)``, so it is the same in every process and independent of
    access order, and train and test splits differ. Images are standardized per channel (zero mean,
    unit std) and returned without augmentation: a flip would change the orientation, i.e. the class.
    Labels cycle ``i % num_classes``, so classes are balanced.
    """

    def __init__(
        self,
        n: int,
        img_size: int,
        in_chans: int = 3,
        num_classes: int = 10,
        seed: int = 0,
        train: bool = True,
    ) -> None:
        if n < 1 or img_size < 1 or in_chans < 1 or num_classes < 1:
            raise ValueError(
                f"SyntheticImages needs positive n, img_size, in_chans, num_classes; "
                f"got {n}, {img_size}, {in_chans}, {num_classes}"
            )
        self.n, self.img_size, self.in_chans, self.num_classes = n, img_size, in_chans, num_classes
        self.seed, self.train = seed, train
        self.classes = tuple(str(c) for c in range(num_classes))
        self.targets = [i % num_classes for i in range(n)]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for SyntheticImages of length {self.n}")
        label = self.targets[index]
        rng = np.random.default_rng([self.seed, int(self.train), index])
        s = self.img_size
        yy, xx = np.meshgrid(np.arange(s) / s, np.arange(s) / s, indexing="ij")
        theta = math.pi * label / self.num_classes + rng.normal(0.0, 0.1 * math.pi / self.num_classes)
        freq = 2.0 + 1.5 * (label % 3)
        phase = rng.uniform(0, 2 * math.pi)
        cy, cx = rng.uniform(0.2, 0.8, size=2)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 0.08**2))
        u = xx * math.cos(theta) + yy * math.sin(theta)
        chans = []
        for ch in range(self.in_chans):  # channels share orientation, differ in phase: colored stripes
            grating = np.sin(2 * math.pi * freq * u + phase + ch * math.pi / 3)
            chans.append(grating + 0.8 * blob + 0.3 * rng.standard_normal((s, s)))
        img = np.stack(chans).astype(np.float32)
        img = (img - img.mean(axis=(1, 2), keepdims=True)) / (img.std(axis=(1, 2), keepdims=True) + 1e-6)
        return torch.from_numpy(img), label


def build_dataset(
    name: str,
    root: str | None,
    train: bool,
    img_size: int,
    in_chans: int,
    transform_train: bool,
    synthetic_size: int = 512,
    seed: int = 0,
    crop_scale_min: float = 0.2,
    pad: int = 0,
) -> tuple[Dataset, tuple[float, ...], tuple[float, ...]]:
    """Dataset ``name`` with its transform, plus the per-channel (mean, std) its images were normalized by.

    - ``fashion_mnist``: ``root`` defaults to the Debian install. With ``in_chans=3`` the gray channel
      is replicated, so 3-channel models (e.g. timm exports) run on it unchanged.
    - ``folder``: ImageFolder layout; uses ``root/train`` and ``root/val``, or when neither exists
      ``root`` itself for both splits (handy for small demo folders); one without the other is refused. ImageNet statistics; their
      channel average for ``in_chans=1``.
    - ``synthetic``: ``SyntheticImages`` of ``synthetic_size`` items keyed by ``seed``; already
      standardized, so (mean, std) is (0, 1), and never augmented.

    ``transform_train`` picks the random augmentation (pre-training, RandomResizedCrop with scale
    (``crop_scale_min``, 1)) over the eval resize (feature extraction, k-NN), independently of which
    split ``train`` selects. ``pad`` zero pixels are added on every side first (not to ``synthetic``).
    """
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")
    if name == "synthetic":
        ds = SyntheticImages(synthetic_size, img_size, in_chans, num_classes=10, seed=seed, train=train)
        return ds, (0.0,) * in_chans, (1.0,) * in_chans
    if name == "fashion_mnist":
        mean = per_channel(FASHION_MNIST_MEAN, in_chans, "mean")
        std = per_channel(FASHION_MNIST_STD, in_chans, "std")
        tf = build_transform(img_size, in_chans, mean, std, train=transform_train, scale=(crop_scale_min, 1.0), pad=pad)
        return FashionMNIST(root or FASHION_MNIST_ROOT, train=train, transform=tf,
                            deterministic=not transform_train), mean, std
    if root is None:
        raise ValueError("dataset 'folder' needs a root directory (data.root=<ImageFolder dir>)")
    if in_chans == 1:
        mean, std = (sum(IMAGENET_MEAN) / 3,), (sum(IMAGENET_STD) / 3,)
    else:
        mean, std = per_channel(IMAGENET_MEAN, in_chans, "mean"), per_channel(IMAGENET_STD, in_chans, "std")
    split, other = ("train", "val") if train else ("val", "train")
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir) and os.path.isdir(os.path.join(root, other)):
        raise DatasetError(f"image folder {root} has {other}/ but no {split}/: the {split} split is missing (it "
                           f"would be read from {root} itself, as one class {other!r}); add {split_dir} or put "
                           "the class folders directly in the root to use the same images for both splits")
    tf = build_transform(img_size, in_chans, mean, std, train=transform_train, scale=(crop_scale_min, 1.0), pad=pad)
    return ImageFolderDataset(split_dir if os.path.isdir(split_dir) else root, tf), mean, std


class MultiView(Dataset):
    """Each item of ``dataset`` as ``views`` copies stacked ``(views, C, H, W)``, with its label.

    The base dataset's random transform runs once per copy, so the views are independent
    augmentations (what a contrastive head compares); the synthetic set is never augmented, so its
    views are equal. Draws follow the loader's seeded RNG stream like any augmentation.
    """

    def __init__(self, dataset: Dataset, views: int) -> None:
        if views < 2:
            raise ValueError(f"MultiView needs views >= 2, got {views}")
        self.dataset, self.views = dataset, views

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        items = [self.dataset[index] for _ in range(self.views)]
        return torch.stack([image for image, _ in items]), items[0][1]


def check_labels(dataset: Dataset, name: str, needed_by: str, num_classes: Mapping[str, int] | None = None) -> None:
    """Refuse, before any work, data whose labels a head cannot learn from: fewer than 2 classes (e.g. an
    image folder with one class folder: unlabelled) or more classes than a head has (`num_classes`: the
    config key of each head's class count -> that count)."""
    classes = list(getattr(dataset, "classes", []))
    if len(classes) < 2:
        raise ValueError(f"{needed_by} needs labels, but data.name={name!r} has {len(classes)} class(es) "
                         f"{classes}: it is unlabelled; use data with one folder per class (>= 2), or the "
                         "objectives 'mim' / 'contrastive', which need no labels")
    for key, count in (num_classes or {}).items():
        if len(classes) > count:
            raise ValueError(f"{key} ({count}) is smaller than the {len(classes)} classes of "
                             f"data.name={name!r}; set {key}={len(classes)}")
