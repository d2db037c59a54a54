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

Modules: ``datasets`` (the three sources, ``build_dataset``, ``MultiView``, ``check_labels``), ``idx``
(the IDX file format), ``transforms`` (augmentation, normalisation statistics), ``loader``
(``SeededLoader``, ``build_loader``, ``views_first``).
"""
from isolocal.data.datasets import (
    DATASET_NAMES,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_FILES,
    FASHION_MNIST_ROOT,
    FashionMNIST,
    ImageFolderDataset,
    MultiView,
    SyntheticImages,
    build_dataset,
    check_labels,
)
from isolocal.data.idx import read_idx
from isolocal.data.loader import SeededLoader, build_loader, views_first
from isolocal.data.transforms import (
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_transform,
)
from isolocal.errors import DatasetError

__all__ = [
    "DATASET_NAMES", "FASHION_MNIST_CLASSES", "FASHION_MNIST_FILES", "FASHION_MNIST_MEAN", "FASHION_MNIST_ROOT",
    "FASHION_MNIST_STD", "IMAGENET_MEAN", "IMAGENET_STD", "DatasetError", "FashionMNIST", "ImageFolderDataset",
    "MultiView", "SeededLoader", "SyntheticImages", "build_dataset", "build_loader", "build_transform",
    "check_labels", "read_idx", "views_first",
]
