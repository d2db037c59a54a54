"""End-to-end fine-tuning of the exported encoder (MAE's recipe, the number the LocalMIM paper reports),
kept at its best epoch on the validation split (the caller tests it once).

The encoder becomes a timm model (`create_timm_model`) with a global-average-pooling head, so the
whole recipe is timm's: layer-wise lr decay from timm's parameter groups (applied through the
scheduler's `lr_scale`), drop path, label smoothing or mixup/cutmix with soft targets, cosine
schedule with warmup.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import timm.optim
import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader, Dataset

from isolocal.core.progress import progress_bar
from isolocal.config import EvalConfig
from isolocal.data import build_loader
from isolocal.eval.features import cuda_eval_precision
from isolocal.eval.linear import cosine_scheduler
from isolocal.io.export import create_timm_model
from isolocal.models.encoder import StagewiseEncoder


def build_classifier(model: StagewiseEncoder | nn.Module, cfg: EvalConfig) -> nn.Module:
    """A timm classifier with an average-pooling head; the source model is copied, never changed.

    A StagewiseEncoder exports its encoder (the last tap's LayerNorm normalizes the tokens before pooling,
    exactly what the 'mean' probe reads); a timm model, e.g. a loaded export, gets a new head.
    """
    if isinstance(model, StagewiseEncoder):
        clf = create_timm_model(model, "mean", num_classes=cfg.num_classes, drop_path_rate=cfg.drop_path)
        clf.to(next(model.parameters()).device)
    else:
        clf = copy.deepcopy(model)
        clf.reset_classifier(cfg.num_classes, global_pool="avg")
    head = clf.get_classifier()
    nn.init.trunc_normal_(head.weight, std=2e-5)  # MAE: near-zero head, so early steps keep the encoder
    nn.init.zeros_(head.bias)
    return clf


def finetune_optimizer(classifier: nn.Module, cfg: EvalConfig) -> Optimizer:
    """AdamW with timm's layer-decay groups: block i of L gets lr_scale = layer_decay ** (L - i)."""
    return timm.optim.create_optimizer_v2(classifier, opt="adamw", lr=cfg.finetune_lr,
                                          weight_decay=cfg.finetune_weight_decay, layer_decay=cfg.layer_decay)


def finetune_criterion(cfg: EvalConfig) -> tuple[nn.Module, Mixup | None]:
    """(loss, mixup): soft-target CE behind mixup/cutmix (which smooths labels itself), else smoothed CE."""
    if cfg.mixup > 0 or cfg.cutmix > 0:
        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                      num_classes=cfg.num_classes)
        return SoftTargetCrossEntropy(), mixup
    if cfg.label_smoothing > 0:
        return LabelSmoothingCrossEntropy(cfg.label_smoothing), None
    return nn.CrossEntropyLoss(), None


@torch.no_grad()
def classifier_accuracy(classifier: nn.Module, dataset: Dataset, batch_size: int = 256, num_workers: int = 0,
                        progress: bool = True) -> float:
    """Top-1 in percent; the classifier's train/eval mode is restored afterwards."""
    device = next(classifier.parameters()).device
    was_training = classifier.training
    classifier.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)  # counted on the device, read once
    try:
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                            pin_memory=torch.cuda.is_available())
        for images, labels in progress_bar(loader, desc="test", disable=not progress, leave=False):
            with cuda_eval_precision(device):
                logits = classifier(images.to(device, non_blocking=True))
            correct += (logits.argmax(1) == torch.as_tensor(labels).to(device, non_blocking=True)).sum()
    finally:
        classifier.train(was_training)
    return 100.0 * int(correct) / len(dataset)


@dataclass
class FinetuneResult:
    """The fine-tuned classifier at its best validation epoch (the earliest among equals), and every epoch's
    training loss and validation top-1."""

    classifier: nn.Module
    val_top1: float
    epoch: int
    epochs: list[dict]


def finetune(model: StagewiseEncoder | nn.Module, train_dataset: Dataset, val_dataset: Dataset, cfg: EvalConfig,
             seed: int = 0, num_workers: int = 0, progress: bool = True) -> FinetuneResult:
    """Fine-tune a copy of the encoder, scoring it on `val_dataset` after every epoch; stops after
    `eval.finetune_patience` epochs without a better validation top-1 (0: never early).

    Runs on the model's device (bf16 autocast and TF32 on CUDA). Losses stay on the device and are
    read once per epoch: a non-finite epoch loss stops the run. Seeds torch's and numpy's global
    RNGs, which drop path and timm's Mixup draw from.
    """
    torch.manual_seed(seed)
    np.random.seed(seed)
    loader = build_loader(train_dataset, cfg.finetune_batch_size, shuffle=True, seed=seed, num_workers=num_workers)
    clf = build_classifier(model, cfg)
    device = next(clf.parameters()).device
    opt = finetune_optimizer(clf, cfg)
    sched = cosine_scheduler(opt, cfg.finetune_epochs, len(loader), cfg.warmup_epochs)
    criterion, mixup = finetune_criterion(cfg)
    history: list[dict] = []
    best: tuple[float, int, dict] | None = None  # (val top-1, epoch, state dict)
    step = 0
    for epoch in range(cfg.finetune_epochs):
        clf.train()
        total = torch.zeros((), dtype=torch.float64, device=device)  # read once per epoch
        for images, labels in progress_bar(loader, desc=f"finetune epoch {epoch}", disable=not progress, leave=False):
            images = images.to(device, non_blocking=True)
            labels = torch.as_tensor(labels).to(device, non_blocking=True)
            if mixup is not None:
                images, labels = mixup(images, labels)
            sched.step_update(step)
            with cuda_eval_precision(device):
                loss = criterion(clf(images), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach()
            step += 1
        train_loss = total.item() / len(loader)
        if not math.isfinite(train_loss):
            raise ValueError(f"fine-tuning diverged in epoch {epoch} (mean loss {train_loss}); "
                             f"lower eval.finetune_lr ({cfg.finetune_lr})")
        val = classifier_accuracy(clf, val_dataset, cfg.linear_batch_size, num_workers, progress)
        history.append({"epoch": epoch, "train_loss": train_loss, "val_top1": val})
        if best is None or val > best[0]:
            best = (val, epoch, copy.deepcopy(clf.state_dict()))
        if cfg.finetune_patience and epoch - best[1] >= cfg.finetune_patience:
            break
    clf.load_state_dict(best[2])
    return FinetuneResult(clf.eval(), best[0], best[1], history)
