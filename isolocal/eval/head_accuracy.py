"""The model's own classifiers: test top-1 of every stage whose head predicts classes, on full, unmasked images.

Probes (k-NN, linear) measure what a stage's features hold; a supervised local learner (DGL, InfoPro,
AugLocal, MAN) is judged by its heads' own predictions, the top one above all. A head predicts classes
when it has `logits(features, prefix)` giving (B, classes) scores (`classify`, `dgl`, `auglocal`,
`infopro` with the task "ce", `man` over one of those); stages with another head have none.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from isolocal.core.progress import progress_bar
from isolocal.eval.features import cuda_eval_precision


def classify_stages(model: nn.Module) -> list[int]:
    """Indices of the stages whose head predicts classes: it has a `logits(features, prefix)` method (a
    head whose `logits` is None, `infopro`'s contrastive task, does not)."""
    heads = [getattr(stage, "head", None) for stage in model.stages]
    return [k for k, head in enumerate(heads) if callable(getattr(head, "logits", None))]


@torch.no_grad()
def head_accuracy(model: nn.Module, dataset: Dataset, batch_size: int = 256, num_workers: int = 0,
                  progress: bool = True) -> dict[int, float]:
    """{stage: top-1 %} of each classifying head's logits on `dataset` (empty when the model has none)."""
    stages = classify_stages(model)
    if not stages:
        return {}
    device = next(model.parameters()).device
    prefix = int(model.family.has_cls)
    correct = dict.fromkeys(stages, 0)
    total = 0
    was_training = model.training
    model.eval()
    try:
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
        for images, labels in progress_bar(loader, desc="classify heads", disable=not progress, leave=False):
            labels = torch.as_tensor(labels).to(device)
            with cuda_eval_precision(device):
                feats = model.encode(images.to(device))
            for k in stages:
                correct[k] += int((model.stages[k].head.logits(feats[k], prefix).argmax(1) == labels).sum())
            total += len(labels)
    finally:
        model.train(was_training)
    return {k: 100.0 * correct[k] / total for k in stages}
