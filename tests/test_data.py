"""Data layer: real Fashion-MNIST IDX files, clear errors for broken data, reproducible batches."""

import gzip
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from isolocal.data import (
    FASHION_MNIST_FILES,
    FASHION_MNIST_ROOT,
    DatasetError,
    FashionMNIST,
    ImageFolderDataset,
    MultiView,
    SyntheticImages,
    build_dataset,
    build_loader,
    build_transform,
    read_idx,
)

needs_fmnist = pytest.mark.skipif(
    not os.path.isdir(FASHION_MNIST_ROOT), reason="apt-get install dataset-fashion-mnist"
)


@pytest.fixture(scope="module")
def fmnist_test():
    return FashionMNIST(train=False)


@needs_fmnist
def test_read_real_fashion_mnist(fmnist_test):
    train = FashionMNIST(train=True)
    assert train.images.shape == (60000, 28, 28) and train.images.dtype == np.uint8
    assert fmnist_test.images.shape == (10000, 28, 28)
    for ds in (train, fmnist_test):
        assert set(np.unique(ds.targets)) == set(range(10))
    img, label = fmnist_test[0]
    assert img.shape == (1, 28, 28) and img.dtype == torch.uint8
    assert isinstance(label, int) and 0 <= label < 10
    # Mean/std constants match the data they claim to describe.
    assert abs(train.images.mean() / 255 - 0.2860) < 1e-3
    assert abs(train.images.std() / 255 - 0.3530) < 1e-3


def _idx_bytes(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, arr.ndim]) + np.array(arr.shape, dtype=">u4").tobytes()
    return header + arr.astype(np.uint8).tobytes()


def test_read_idx_raw_and_gz_roundtrip(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw, gz = tmp_path / "a-idx3-ubyte", tmp_path / "a-idx3-ubyte.gz"
    raw.write_bytes(_idx_bytes(arr))
    gz.write_bytes(gzip.compress(_idx_bytes(arr)))
    np.testing.assert_array_equal(read_idx(raw), arr)
    np.testing.assert_array_equal(read_idx(gz), arr)


@pytest.mark.parametrize(
    "kind", ["truncated_gz", "garbage_gz", "short_payload", "bad_magic", "missing"]
)
def test_broken_idx_names_path(tmp_path, kind):
    arr = np.zeros((4, 28, 28), dtype=np.uint8)
    path = tmp_path / "broken-idx3-ubyte.gz"
    good = gzip.compress(_idx_bytes(arr))
    if kind == "truncated_gz":
        path.write_bytes(good[: len(good) // 2])
    elif kind == "garbage_gz":
        path.write_bytes(good[:10] + b"\xff" * 40)
    elif kind == "short_payload":
        path.write_bytes(gzip.compress(_idx_bytes(arr)[:-100]))
    elif kind == "bad_magic":
        path.write_bytes(gzip.compress(b"\x12\x34" + _idx_bytes(arr)[2:]))
    with pytest.raises(DatasetError, match=re.escape(str(path))):
        read_idx(path)


def test_missing_fashion_mnist_dir_says_how_to_install(tmp_path):
    with pytest.raises(DatasetError, match="dataset-fashion-mnist") as e:
        FashionMNIST(tmp_path / "nowhere")
    assert "nowhere" in str(e.value) and "data.root" in str(e.value)


def test_fashion_mnist_validates_every_file_up_front(tmp_path):
    """A corrupt *test* labels file fails when building the *train* split, before loading anything."""
    arr = np.zeros((3, 28, 28), dtype=np.uint8)
    labels = np.zeros(3, dtype=np.uint8)
    for images_file, labels_file in FASHION_MNIST_FILES.values():
        (tmp_path / images_file).write_bytes(gzip.compress(_idx_bytes(arr)))
        (tmp_path / labels_file).write_bytes(gzip.compress(_idx_bytes(labels)))
    assert len(FashionMNIST(tmp_path, train=True)) == 3
    bad = tmp_path / FASHION_MNIST_FILES[False][1]
    bad.write_bytes(b"not gzip, not idx")
    with pytest.raises(DatasetError, match=re.escape(str(bad))):
        FashionMNIST(tmp_path, train=True)
    bad.unlink()
    with pytest.raises(DatasetError, match="t10k-labels-idx1-ubyte.gz"):
        FashionMNIST(tmp_path, train=True)


def _make_folder(root, n_per_class=3, size=20):
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(n_per_class):
            px = rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8)
            Image.fromarray(px).save(root / cls / f"{i}.png")


def test_image_folder_corrupt_file_is_named(tmp_path):
    _make_folder(tmp_path)
    corrupt = tmp_path / "dog" / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"definitely not a png")
    ds = ImageFolderDataset(tmp_path, build_transform(16, 3, (0.5,), (0.5,), train=False))
    assert ds.classes == ["cat", "dog"]
    img, label = ds[0]
    assert img.shape == (3, 16, 16) and img.dtype == torch.float32 and label == 0
    bad_index = [p for p, _ in ds.samples].index(str(corrupt))
    with pytest.raises(DatasetError, match=re.escape(str(corrupt))):
        ds[bad_index]


def test_image_folder_missing_root_is_named(tmp_path):
    with pytest.raises(DatasetError, match=re.escape(str(tmp_path / "absent"))):
        ImageFolderDataset(tmp_path / "absent")


@needs_fmnist
@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("train", [True, False])
def test_transform_shapes_tensor_and_pil(fmnist_test, tmp_path, in_chans, train):
    tf = build_transform(32, in_chans, (0.2860,), (0.3530,), train=train)
    raw, _ = fmnist_test[0]
    out = tf(raw)
    assert type(out) is torch.Tensor and out.shape == (in_chans, 32, 32) and out.dtype == torch.float32
    if in_chans == 3:  # gray replicated
        assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
    pil = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    assert tf(pil).shape == (in_chans, 32, 32)


@needs_fmnist
def test_eval_transform_is_deterministic_and_normalized(fmnist_test):
    tf = build_transform(28, 1, (0.2860,), (0.3530,), train=False)
    out = tf(fmnist_test[0][0])
    expected = (fmnist_test[0][0].float() / 255 - 0.2860) / 0.3530
    torch.testing.assert_close(out, expected)


def _batches(loader, n=3):
    return [b for b, _ in zip(loader, range(n))]


@needs_fmnist
def test_same_seed_same_batches_with_random_transforms():
    ds, _, _ = build_dataset("fashion_mnist", None, False, 32, 1, transform_train=True)
    loader = lambda seed: build_loader(ds, 16, shuffle=True, seed=seed)  # noqa: E731
    torch.manual_seed(123)
    a = _batches(loader(7))
    torch.manual_seed(456)  # the caller's global RNG must not leak into the data
    state = torch.get_rng_state()
    b = _batches(loader(7))
    assert torch.equal(torch.get_rng_state(), state), "iterating a loader changed the global RNG"
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    c = _batches(loader(8))
    assert not torch.equal(a[0][0], c[0][0])
    # The same indices under a different seed get different crops: the augmentation is random.
    same_idx = build_loader(ds, 16, shuffle=False, seed=7), build_loader(ds, 16, shuffle=False, seed=8)
    xa, xb = (next(iter(dl))[0] for dl in same_idx)
    assert not torch.equal(xa, xb)


@needs_fmnist
def test_same_seed_same_batches_with_workers():
    ds = FashionMNIST(train=False, transform=build_transform(32, 1, (0.2860,), (0.3530,), train=True))
    sub = torch.utils.data.Subset(ds, range(64))
    a = _batches(build_loader(sub, 16, shuffle=True, seed=3, num_workers=1), 2)
    b = _batches(build_loader(sub, 16, shuffle=True, seed=3, num_workers=1), 2)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


@needs_fmnist
@pytest.mark.parametrize("views", [1, 2])
def test_prefetch_gives_the_in_process_batches(views):
    """The background process draws the in-process stream: the same crops and flips, epoch after
    epoch (a loader is iterated once per epoch), two views included, and the caller's RNG untouched."""
    ds, _, _ = build_dataset("fashion_mnist", None, False, 32, 1, transform_train=True)
    ds = torch.utils.data.Subset(ds, range(96))
    ds = MultiView(ds, views) if views > 1 else ds
    runs = []
    for prefetch in (False, True):
        loader = build_loader(ds, 16, shuffle=True, seed=11, prefetch=prefetch)
        torch.manual_seed(5)
        runs.append(([b for _ in range(2) for b in loader], torch.rand(3)))
    (a, after_a), (b, after_b) = runs
    assert len(a) == len(b) == 12
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert torch.equal(after_a, after_b), "the prefetching loader moved the global RNG"
    assert not torch.equal(a[0][0], a[6][0]), "the two epochs should differ"


@needs_fmnist
@pytest.mark.parametrize("in_chans, pad", [(1, 0), (3, 2)])
def test_a_deterministic_transform_runs_on_the_whole_batch_with_the_same_values(in_chans, pad):
    ds, _, _ = build_dataset("fashion_mnist", None, False, 32, in_chans, transform_train=False, pad=pad)
    assert ds.deterministic
    indices = [5, 0, 999, 17, 4321]
    together = ds.__getitems__(indices)
    one_by_one = [ds[i] for i in indices]
    assert [y for _, y in together] == [y for _, y in one_by_one]
    for (xa, _), (xb, _) in zip(together, one_by_one):
        assert torch.equal(xa, xb)
    augmented, _, _ = build_dataset("fashion_mnist", None, False, 32, in_chans, transform_train=True)
    assert not augmented.deterministic  # random draws stay one image at a time, in order


def test_loader_rejects_empty_and_conflicting_options():
    ds = SyntheticImages(8, 8, 1, 2, seed=0)
    with pytest.raises(ValueError, match="no batch"):
        build_loader(ds, 16, shuffle=True, seed=0)
    with pytest.raises(ValueError, match="sampler"):
        build_loader(ds, 4, shuffle=True, seed=0, sampler=torch.utils.data.SequentialSampler(ds))
    with pytest.raises(ValueError, match="num_workers=0"):
        build_loader(ds, 4, shuffle=True, seed=0, num_workers=2, prefetch=True)


def test_synthetic_is_deterministic_and_class_dependent():
    a = SyntheticImages(40, 16, 3, num_classes=4, seed=5)
    b = SyntheticImages(40, 16, 3, num_classes=4, seed=5)
    for i in (0, 17, 39):
        (xa, ya), (xb, yb) = a[i], b[i]
        assert torch.equal(xa, xb) and ya == yb
    assert a[0][0].shape == (3, 16, 16) and a[0][0].dtype == torch.float32
    assert not torch.equal(a[0][0], SyntheticImages(40, 16, 3, 4, seed=6)[0][0])
    assert not torch.equal(a[0][0], SyntheticImages(40, 16, 3, 4, seed=5, train=False)[0][0])
    # Class-dependent: 1-NN on raw pixels from one split to the other beats chance (0.25) by far.
    test = SyntheticImages(40, 16, 3, num_classes=4, seed=5, train=False)
    xs = torch.nn.functional.normalize(torch.stack([a[i][0].flatten() for i in range(40)]), dim=1)
    xt = torch.nn.functional.normalize(torch.stack([test[i][0].flatten() for i in range(40)]), dim=1)
    pred = torch.tensor(a.targets)[(xt @ xs.T).argmax(1)]
    assert (pred == torch.tensor(test.targets)).float().mean() > 0.6


def test_build_dataset_names_and_stats(tmp_path):
    with pytest.raises(ValueError, match=r"'imagenet'.*fashion_mnist, folder, synthetic"):
        build_dataset("imagenet", None, True, 32, 3, True)
    ds, mean, std = build_dataset("synthetic", None, True, 32, 3, True, synthetic_size=10)
    assert len(ds) == 10 and mean == (0.0,) * 3 and std == (1.0,) * 3
    _make_folder(tmp_path / "train")
    ds, mean, std = build_dataset("folder", str(tmp_path), True, 16, 1, True)
    assert len(ds) == 6 and len(mean) == 1 and ds[0][0].shape == (1, 16, 16)
    with pytest.raises(ValueError, match="root"):
        build_dataset("folder", None, True, 16, 3, True)
