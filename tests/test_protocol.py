"""The evaluation protocol a reviewer accepts: a fixed validation split carved out of the labelled
training images, every selection made on it, the test split read once afterwards, and the raw-pixel floor."""
from __future__ import annotations

import pytest
import torch

from isolocal.config.load import load_run_config
from isolocal.eval import SplitReadTwice, eval_splits, knn_accuracy
from isolocal.eval.protocols import evaluate, select_stage
from isolocal.eval.splits import val_indices
from isolocal.io.load import load_model

SETS = ["data.name='synthetic'", "data.synthetic_size=120", "eval.feature='mean'", "eval.knn_k=5",
        "eval.linear_epochs=4", "eval.linear_batch_size=32"]


def _cfg(*extra: str):
    return load_run_config(None, SETS + list(extra))


def test_validation_split_is_seeded_disjoint_and_a_tenth_of_the_labelled_images():
    train, val = val_indices(1000, 0.1, seed=0)
    assert len(val) == 100 and len(train) == 900
    assert not set(train) & set(val) and set(train) | set(val) == set(range(1000))
    assert val_indices(1000, 0.1, seed=0) == (train, val)  # the same split in every run and process
    assert val_indices(1000, 0.1, seed=1)[1] != val
    with pytest.raises(ValueError, match="eval.val_fraction = 0.001 of 100 labelled training images leaves 0"):
        val_indices(100, 0.001, seed=0)


def test_splits_partition_the_labelled_images_and_test_is_read_once():
    cfg = _cfg("eval.train_subset=100", "eval.test_subset=40")
    splits = eval_splits(cfg, cfg.model)
    assert splits.sizes == {"train_images": 90, "val_images": 10, "test_images": 40}
    assert not set(splits.train.indices) & set(splits.val().indices)
    splits.test()
    with pytest.raises(SplitReadTwice, match="read once per evaluation"):
        splits.test()
    assert splits.reads == ["val", "test"]


def test_bad_val_fraction_is_refused_by_the_config():
    with pytest.raises(ValueError, match=r"eval.val_fraction must be in \(0, 1\), got 1.5"):
        _cfg("eval.val_fraction=1.5")


def test_selection_reads_validation_only_and_test_once_after_it():
    """Every validation number and selection (each probe's epoch, each protocol's stage) is the same
    whichever test set follows, and the test split is read once, last."""
    runs = [evaluate(["knn", "linear"], _cfg(f"eval.test_subset={n}"), "random", progress=False) for n in (30, 70)]
    picked = [[{k: v for k, v in row.items() if not k.endswith("_top1")} for row in r["results"]] for r in runs]
    assert picked[0] == picked[1] and runs[0]["selected"] == runs[1]["selected"]
    assert {k for k in runs[0]["results"][0]} >= {"knn_val", "linear_val", "linear_epoch", "knn_top1", "linear_top1"}
    assert all(r["reads"] == ["val", "test"] for r in runs)


def test_tuning_without_test_stops_at_the_validation_numbers():
    result = evaluate(["knn", "linear"], _cfg(), "random", progress=False, read_test=False)
    assert result["reads"] == ["val"]
    assert all("knn_top1" not in row and "linear_top1" not in row and "knn_val" in row for row in result["results"])


def test_the_selected_stage_is_the_best_on_validation_the_shallowest_among_equals():
    assert select_stage([50.0, 70.0, 60.0]) == 1
    assert select_stage([70.0, 50.0, 70.0]) == 0
    result = evaluate(["knn"], _cfg(), "random", progress=False)
    vals = [row["knn_val"] for row in result["results"]]
    assert result["selected"]["knn"] == vals.index(max(vals))


def test_pixel_floor_is_the_probes_on_the_flattened_images():
    cfg = _cfg("eval.test_subset=50", "eval.feature='cls'")  # pooling does not apply to one token per image
    result = evaluate(["knn", "linear"], cfg, "pixels", progress=False)
    assert [(row["stage"], row["tap"], row["dim"]) for row in result["results"]] == [(0, -1, 32 * 32)]
    splits = eval_splits(cfg, cfg.model)

    def flat(ds):
        images, labels = zip(*(ds[i] for i in range(len(ds))))
        return torch.stack(images).flatten(1), torch.tensor(labels)

    (tx, ty), (vx, vy) = flat(splits.train), flat(splits.test())
    expected = knn_accuracy(tx, ty, vx, vy, num_classes=10, k=5, t=0.07)
    assert result["results"][0]["knn_top1"] == pytest.approx(expected)
    with pytest.raises(ValueError, match="'pixels' has no encoder to fine-tune"):
        evaluate(["finetune"], cfg, "pixels", progress=False)
    assert load_model("pixels", cfg).num_stages == 1
