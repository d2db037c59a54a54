"""An evaluation's three splits: probes train on `train`, every selection reads `val`, `test` is read once.

The validation split is carved out of the labelled training images (`eval.train_subset`, all when 0):
`eval.val_fraction` of them, drawn with `eval.val_seed`, the same for every run and seed of a study,
and the probes and fine-tuning never train on them. Which stage is "best", which probe or fine-tune
epoch is kept and any tuned setting are chosen on it; then the test split (the whole test set unless
`eval.test_subset`) is read once, for the numbers a report quotes. `EvalSplits` records every read of
`val` and `test` in order and refuses a second read of `test`, so a protocol that peeks cannot run.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils.data import Dataset, Subset

from isolocal.config import ModelConfig, RunConfig
from isolocal.data import build_dataset


class SplitReadTwice(RuntimeError):
    """A protocol asked for the test split a second time: its selection may have seen test accuracy."""


@dataclass
class EvalSplits:
    """(train, val, test) of one evaluation; `reads` lists "val" / "test" in the order they were read."""

    train: Dataset
    _val: Dataset
    _test: Dataset
    reads: list[str] = field(default_factory=list)

    def val(self) -> Dataset:
        self.reads.append("val")
        return self._val

    def test(self) -> Dataset:
        """The test split, once: read it after every selection is made."""
        if "test" in self.reads:
            raise SplitReadTwice("the test split is read once per evaluation, after every selection on the "
                                     "validation split; this protocol asked for it again")
        self.reads.append("test")
        return self._test

    @property
    def sizes(self) -> dict[str, int]:
        return {"train_images": len(self.train), "val_images": len(self._val), "test_images": len(self._test)}


def _first(dataset: Dataset, n: int, what: str) -> Dataset:
    """The first n items (0 = all); asking for more than exist is an error, not a silent cap."""
    if n == 0:
        return dataset
    if n > len(dataset):
        raise ValueError(f"eval.{what} = {n} but the dataset holds only {len(dataset)} images")
    return Subset(dataset, range(n))


def val_indices(labelled: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, val) indices of `labelled` images: round(fraction * labelled) drawn with `seed` for val
    (at least one, and at least one left to train on), both sorted."""
    n_val = round(fraction * labelled)
    if not 1 <= n_val < labelled:
        raise ValueError(f"eval.val_fraction = {fraction} of {labelled} labelled training images leaves "
                         f"{n_val} for validation and {labelled - n_val} to train on; both need at least one "
                         "(raise eval.train_subset or change eval.val_fraction)")
    order = torch.randperm(labelled, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[n_val:]), sorted(order[:n_val])


def eval_splits(cfg: RunConfig, model_cfg: ModelConfig, augment_train: bool = False) -> EvalSplits:
    """The run's data as train / val / test, sized for the model (which may come from a checkpoint). All
    use the plain eval transform unless `augment_train` (fine-tuning) gives the training part the
    pre-training augmentation; val is always plain."""
    d, e = cfg.data, cfg.eval

    def split(train: bool, augment: bool) -> Dataset:
        ds, _, _ = build_dataset(d.name, d.root or None, train, model_cfg.img_size, model_cfg.in_chans,
                                 transform_train=augment, synthetic_size=d.synthetic_size, seed=cfg.train.seed,
                                 pad=d.pad)
        return _first(ds, e.train_subset if train else e.test_subset, "train_subset" if train else "test_subset")

    plain = split(True, False)
    train_idx, val_idx = val_indices(len(plain), e.val_fraction, e.val_seed)
    source = split(True, True) if augment_train else plain
    return EvalSplits(Subset(source, train_idx), Subset(plain, val_idx), split(False, False))
