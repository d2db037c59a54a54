"""Weighted k-NN classification on cosine similarity (DINO's protocol, Caron et al. 2021).

Each test feature votes with its k most similar training features; a neighbour with cosine
similarity s adds exp(s / T) to its class. No training, no hyper-parameters beyond k and T, so it
is the cheapest honest read-out of a representation, per stage, also during pre-training.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from isolocal.config import EvalConfig
from isolocal.eval.features import SplitFeatures, cuda_eval_precision, split_features


def knn_predict(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    num_classes: int,
    k: int = 20,
    t: float = 0.07,
    chunk: int = 1024,
) -> Tensor:
    """Predicted class of every test feature, computed `chunk` test rows at a time."""
    if not 1 <= k <= len(train_feats):
        raise ValueError(f"knn k must be in [1, {len(train_feats)}] (the number of training features), got {k}")
    if t <= 0:
        raise ValueError(f"knn temperature must be > 0, got {t}")
    if int(train_labels.max()) >= num_classes or int(train_labels.min()) < 0:
        raise ValueError(f"training labels must lie in [0, {num_classes - 1}] (num_classes = {num_classes}), "
                         f"got labels from {int(train_labels.min())} to {int(train_labels.max())}")
    bank = F.normalize(train_feats.float(), dim=1)
    preds = []
    with cuda_eval_precision(bank.device, autocast=False):  # TF32 similarities on CUDA
        for start in range(0, len(test_feats), chunk):
            query = F.normalize(test_feats[start:start + chunk].float(), dim=1)
            sims, idx = (query @ bank.T).topk(k, dim=1)
            votes = torch.zeros(len(query), num_classes, device=query.device)
            votes.scatter_add_(1, train_labels[idx], (sims / t).exp())
            preds.append(votes.argmax(dim=1))
    return torch.cat(preds)


def knn_accuracy(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, test_labels: Tensor,
                 num_classes: int, k: int = 20, t: float = 0.07) -> float:
    """Top-1 accuracy in percent."""
    preds = knn_predict(train_feats, train_labels, test_feats, num_classes, k, t)
    return 100.0 * (preds == test_labels).float().mean().item()


def knn_per_stage(bank: SplitFeatures, query: SplitFeatures, cfg: EvalConfig) -> list[float]:
    """k-NN top-1 (percent) of every stage: `query`'s images voted on by `bank`'s (the probes' training part)."""
    return [knn_accuracy(a, bank.labels, b, query.labels, cfg.num_classes, cfg.knn_k, cfg.knn_t)
            for a, b in zip(bank.stages, query.stages)]


def check_knn(cfg: EvalConfig, train_size: int) -> None:
    """k must not exceed the training set; checked before features are extracted."""
    if cfg.knn_k > train_size:
        raise ValueError(f"eval.knn_k = {cfg.knn_k} exceeds the {train_size} training images the probes use "
                         "(the labelled images less the validation split)")


def online_knn(model: nn.Module, train_dataset: Dataset, val_dataset: Dataset, cfg: EvalConfig,
               num_workers: int = 0) -> dict[str, float]:
    """k-NN during pre-training, on the validation split: {"knn_val_top1_stage<k>": percent, ...}, ready
    for a JSON-lines log. Monitoring reads validation like every other repeated look, never test.

    Pass the eval-transform splits (`eval_splits(run_cfg, model.cfg)`), not the augmented training
    loader's; the model is not changed and its train/eval mode is restored afterwards.
    """
    check_knn(cfg, len(train_dataset))
    bank = split_features(model, train_dataset, cfg, num_workers, progress=False)
    query = split_features(model, val_dataset, cfg, num_workers, progress=False)
    return {f"knn_val_top1_stage{k}": acc for k, acc in enumerate(knn_per_stage(bank, query, cfg))}
