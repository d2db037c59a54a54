"""Datasets, transforms and loaders.

Three sources, one contract: every dataset yields ``(image, label)`` with ``image`` a float tensor
``(C, H, W)`` once its transform has run and ``label`` a Python int.

- ``FashionMNIST``: the real 28x28 gray IDX files that Debian's ``dataset-fashion-mnist`` installs;
  this is the data the small CPU recipes train on.
- ``ImageFolderDataset``: torchvision's ImageFolder layout (ImageNet and friends), with a corrupt file
  reported by path instead of a bare PIL traceback from inside a worker.
- ``SyntheticImages``: class-dependent gratings that need no files, for tests and smoke runs.

Reproducibility: ``build_loader`` makes both the sample order and the random augmentations a
function of its ``seed`` alone, so a global run and an isolated run of one config (or two runs with
the same seed) see identical batches. See ``build_loader`` for how.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2 as T
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import tv_tensors
from torchvision.datasets import ImageFolder

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_MEAN: tuple[float, ...] = (0.2860,)
FASHION_MNIST_STD: tuple[float, ...] = (0.3530,)
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
FASHION_MNIST_FILES = {
    True: ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    False: ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
IMAGENET_MEAN: tuple[float, ...] = tuple(IMAGENET_DEFAULT_MEAN)
IMAGENET_STD: tuple[float, ...] = tuple(IMAGENET_DEFAULT_STD)
DATASET_NAMES = ("fashion_mnist", "folder", "synthetic")

_FASHION_MNIST_HINT = (
    "install Debian's package dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or "
    "pass data.root=<dir with train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
    "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz>"
)


class DatasetError(ValueError):
    """A dataset file or directory is missing, truncated or malformed; the message names it."""


# ----------------------------------------------------------------------------------------- IDX files

# IDX type codes (third magic byte) -> big-endian numpy dtype.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def _open_idx(path: str):
    """Open raw or gzip'd IDX by content, not by suffix, so a renamed file still reads."""
    with open(path, "rb") as f:
        gz = f.read(2) == _GZIP_MAGIC
    return gzip.open(path, "rb") if gz else open(path, "rb")


def _parse_idx_header(head: bytes, path: str) -> tuple[np.dtype, tuple[int, ...], int]:
    """Decode magic + dims -> (dtype, shape, header length in bytes)."""
    if len(head) < 4:
        raise DatasetError(f"{path}: truncated IDX file ({len(head)} bytes, no complete magic number)")
    if head[0] != 0 or head[1] != 0 or head[2] not in _IDX_DTYPES:
        raise DatasetError(
            f"{path}: bad IDX magic number 0x{head[:4].hex()} "
            f"(expected 0x0000TTDD with type TT in {sorted(hex(k) for k in _IDX_DTYPES)})"
        )
    ndim = head[3]
    hlen = 4 + 4 * ndim
    if len(head) < hlen:
        raise DatasetError(f"{path}: truncated IDX header ({len(head)} of {hlen} bytes)")
    shape = tuple(int(d) for d in np.frombuffer(head[4:hlen], dtype=">u4"))
    return _IDX_DTYPES[head[2]], shape, hlen


def _read_idx_header(path: str) -> tuple[np.dtype, tuple[int, ...]]:
    """Read only the header, so a dataset can validate all its files before decompressing any."""
    try:
        with _open_idx(path) as f:
            head = f.read(4)
            if len(head) == 4:
                head += f.read(4 * head[3])
    except FileNotFoundError as e:
        raise DatasetError(f"{path}: file not found") from e
    except (OSError, EOFError, zlib.error) as e:
        raise DatasetError(f"{path}: cannot read IDX header ({e})") from e
    dtype, shape, _ = _parse_idx_header(head, path)
    return dtype, shape


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (raw or gzip'd) into a native-endian array of the shape its header declares.

    Any missing, truncated or malformed file raises ``DatasetError`` naming ``path``, because a bare
    ``EOFError`` from gzip says nothing about which of several data files is broken.
    """
    path = os.fspath(path)
    try:
        with _open_idx(path) as f:
            buf = f.read()
    except FileNotFoundError as e:
        raise DatasetError(f"{path}: file not found") from e
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise DatasetError(f"{path}: truncated or corrupt file ({e})") from e
    dtype, shape, hlen = _parse_idx_header(buf, path)
    expected = hlen + math.prod(shape) * dtype.itemsize
    if len(buf) != expected:
        raise DatasetError(
            f"{path}: size mismatch, header declares shape {shape} of {dtype.name} "
            f"({expected} bytes with header) but the file holds {len(buf)} bytes"
        )
    return np.frombuffer(buf, dtype=dtype, offset=hlen).reshape(shape).astype(dtype.newbyteorder("="))


# ------------------------------------------------------------------------------------------- datasets


class FashionMNIST(Dataset):
    """Fashion-MNIST from its four IDX files; items are ``(transform(uint8 (1, 28, 28)), int)``.

    All four files are checked (existence, header, matching counts) before anything is decompressed,
    so a broken install fails at once with the file's name rather than minutes into a run. The raw
    uint8 array stays in memory (47 MB for train) and is shared copy-on-write with forked workers.
    Without a transform the item is the raw uint8 tensor.
    """

    classes = FASHION_MNIST_CLASSES

    def __init__(
        self,
        root: str | os.PathLike = FASHION_MNIST_ROOT,
        train: bool = True,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.root = os.fspath(root)
        self.train = train
        self.transform = transform
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
            idtype, ishape = _read_idx_header(ipath)
            ldtype, lshape = _read_idx_header(lpath)
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


# ------------------------------------------------------------------------------------------ transforms


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


def _per_channel(values: Sequence[float], in_chans: int, what: str) -> tuple[float, ...]:
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
    mean = _per_channel(mean, in_chans, "mean")
    std = _per_channel(std, in_chans, "std")
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
    - ``folder``: ImageFolder layout; uses ``root/train`` or ``root/val`` when that exists, else
      ``root`` itself for both splits (handy for small demo folders). ImageNet statistics; their
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
        mean = _per_channel(FASHION_MNIST_MEAN, in_chans, "mean")
        std = _per_channel(FASHION_MNIST_STD, in_chans, "std")
        tf = build_transform(img_size, in_chans, mean, std, train=transform_train, scale=(crop_scale_min, 1.0), pad=pad)
        return FashionMNIST(root or FASHION_MNIST_ROOT, train=train, transform=tf), mean, std
    if root is None:
        raise ValueError("dataset 'folder' needs a root directory (data.root=<ImageFolder dir>)")
    if in_chans == 1:
        mean, std = (sum(IMAGENET_MEAN) / 3,), (sum(IMAGENET_STD) / 3,)
    else:
        mean, std = _per_channel(IMAGENET_MEAN, in_chans, "mean"), _per_channel(IMAGENET_STD, in_chans, "std")
    split_dir = os.path.join(root, "train" if train else "val")
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


def check_labels(dataset: Dataset, name: str, num_classes: int, needed_by: str) -> None:
    """Refuse, before any work, data whose labels a head cannot learn from: fewer than 2 classes (e.g. an
    image folder with one class folder: unlabelled) or more classes than the head has (`num_classes`)."""
    classes = list(getattr(dataset, "classes", []))
    if len(classes) < 2:
        raise ValueError(f"{needed_by} needs labels, but data.name={name!r} has {len(classes)} class(es) "
                         f"{classes}: it is unlabelled; use data with one folder per class (>= 2), or the "
                         "objectives 'mim' / 'contrastive', which need no labels")
    if len(classes) > num_classes:
        raise ValueError(f"model.num_classes ({num_classes}) is smaller than the {len(classes)} classes of "
                         f"data.name={name!r}; set model.num_classes={len(classes)}")


def views_first(images: torch.Tensor) -> torch.Tensor:
    """A loader batch of stacked views (n, views, C, H, W) -> (views * n, C, H, W) as [view 1; view 2; ...]."""
    return images.transpose(0, 1).flatten(0, 1)


# -------------------------------------------------------------------------------------------- loaders


class SeededLoader(DataLoader):
    """A DataLoader whose random augmentations, not only its order, follow its generator.

    With workers, torch seeds each worker's global RNG from the generator (``base_seed + worker_id``),
    so transforms are reproducible already. In-process (``num_workers=0``) they would draw from the
    caller's global RNG, which the model also consumes (dropout, drop path) differently in a global
    and an isolated run. So here each iteration draws a seed from the generator and the transforms
    run on a private CPU RNG stream, swapped in only while a batch is fetched; the caller's global
    RNG is left untouched.
    """

    def __iter__(self) -> Iterator[Any]:
        if self.num_workers > 0:
            return self._from_workers(super().__iter__())
        seed = int(torch.randint(2**62, (), generator=self.generator))
        return self._in_process(super().__iter__(), torch.Generator().manual_seed(seed).get_state())

    @staticmethod
    def _from_workers(batches: Iterator[Any]) -> Iterator[Any]:
        """A worker's error as the same one-line error it is without workers: torch re-raises it with
        the worker's whole traceback in the message; only its last line (the error itself) is kept."""
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except Exception as err:
                text = str(err)
                if "Original Traceback" not in text:
                    raise
                last = text.strip().splitlines()[-1]
                raise type(err)(last.split(": ", 1)[1] if ": " in last else last) from None
            yield batch

    @staticmethod
    def _in_process(batches: Iterator[Any], state: torch.Tensor) -> Iterator[Any]:
        while True:
            outer = torch.get_rng_state()
            torch.set_rng_state(state)
            try:
                batch = next(batches)
            except StopIteration:
                return
            finally:
                state = torch.get_rng_state()
                torch.set_rng_state(outer)
            yield batch


def build_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    seed: int,
    num_workers: int = 0,
    drop_last: bool = True,
    sampler: Sampler | None = None,
) -> SeededLoader:
    """A loader whose batches (order and augmentations) are a function of ``seed`` alone.

    Iterating the same loader again continues its generator, giving a new but reproducible order.
    For runs that resume from a checkpoint, build one loader per epoch with ``seed + epoch`` so
    epoch ``e`` is the same whether or not the run was interrupted. For data parallelism pass a
    ``DistributedSampler(dataset, shuffle=True, seed=seed)`` and call its ``set_epoch(epoch)``; the
    sampler then owns the order, so ``shuffle`` must be False. Workers are not persistent, so each
    epoch's workers are re-seeded from the generator. Batches come in pinned memory when CUDA is
    available, so the trainer's ``non_blocking`` copies to the GPU do not wait for its stream.
    """
    if sampler is not None and shuffle:
        raise ValueError("pass shuffle=False with a sampler: the sampler decides the order, shuffle there")
    n = len(sampler) if sampler is not None else len(dataset)
    if drop_last and n < batch_size:
        raise ValueError(f"drop_last with {n} samples and batch_size={batch_size} would yield no batch")
    return SeededLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        generator=torch.Generator().manual_seed(seed),
        pin_memory=torch.cuda.is_available(),
    )
