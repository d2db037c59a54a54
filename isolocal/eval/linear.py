"""Linear probes, one per stage, on a frozen encoder (MAE's protocol, He et al. 2022).

The head is BatchNorm1d without affine parameters followed by a Linear layer (weights N(0, 0.01)):
the parameter-free BatchNorm puts every stage's features on one scale, so a single learning rate
fits all stages. Features are extracted once, so the encoder is never in the graph and cannot
change; the probe then trains for many epochs in seconds.
"""
from __future__ import annotations

import math

import timm.optim
import torch
import torch.nn.functional as F
from timm.scheduler import CosineLRScheduler
from torch import Tensor, nn
from torch.optim import Optimizer

from isolocal.core.progress import progress_bar
from isolocal.config import EvalConfig
from isolocal.eval.features import StageFeatures, cuda_eval_precision


def check_optimizer(name: str) -> None:
    """Any optimizer timm's factory knows; checked before features are extracted."""
    valid = timm.optim.list_optimizers()
    if name not in valid:
        raise ValueError(f"eval.linear_optimizer {name!r} is not a timm optimizer; valid names: {', '.join(valid)}")


def cosine_scheduler(optimizer: Optimizer, epochs: int, steps_per_epoch: int, warmup_epochs: float) -> CosineLRScheduler:
    """Per-step linear warmup then half-cycle cosine to 0; call `step_update(step)` before each step.

    timm's scheduler also applies each param group's `lr_scale` (layer-wise lr decay).
    """
    total = epochs * steps_per_epoch
    warmup = min(int(round(warmup_epochs * steps_per_epoch)), total - 1)
    return CosineLRScheduler(optimizer, t_initial=total - warmup, warmup_t=warmup, warmup_prefix=True,
                             lr_min=0.0, warmup_lr_init=0.0, t_in_epochs=False)


EXPLODED = 10.0  # an epoch's mean loss above this many times chance level (ln num_classes) has diverged


def check_probe_loss(loss: float, when: str, num_classes: int, desc: str, lr: float) -> None:
    """Refuse a probe whose mean loss (`when`: in which epoch, or after the last update) is non-finite or has
    exploded past `EXPLODED` x chance level: its accuracy would be a diverged probe's, not the features'."""
    chance = math.log(num_classes)
    if not math.isfinite(loss) or loss > EXPLODED * chance:
        raise ValueError(f"{desc} diverged {when}: mean loss {loss:.4g} (chance level {chance:.3g}); lower "
                         f"eval.linear_lr ({lr:g})")


class LinearProbe(nn.Sequential):
    """BatchNorm1d(affine=False, eps=1e-6) + Linear, as in MAE's linear probing."""

    def __init__(self, dim: int, num_classes: int, generator: torch.Generator | None = None):
        super().__init__(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
        nn.init.trunc_normal_(self[1].weight, std=0.01, generator=generator)
        nn.init.zeros_(self[1].bias)


def train_linear_probe(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, cfg: EvalConfig,
                       seed: int = 0, desc: str = "linear probe", progress: bool = True) -> float:
    """Train one probe on precomputed features; return its test top-1 in percent."""
    check_optimizer(cfg.linear_optimizer)
    gen = torch.Generator().manual_seed(seed)
    probe = LinearProbe(train_x.shape[1], cfg.num_classes, gen).to(train_x.device)
    opt = timm.optim.create_optimizer_v2(probe, opt=cfg.linear_optimizer, lr=cfg.linear_lr, weight_decay=0.0,
                                         momentum=0.9)
    batch = min(cfg.linear_batch_size, len(train_x))
    steps_per_epoch = max(1, len(train_x) // batch)  # full batches only: BatchNorm needs > 1 sample
    sched = cosine_scheduler(opt, cfg.linear_epochs, steps_per_epoch, cfg.warmup_epochs)
    probe.train()
    step = 0
    with cuda_eval_precision(train_x.device, autocast=False):  # TF32 on CUDA; the loss is read once per epoch
        for epoch in progress_bar(range(cfg.linear_epochs), desc=desc, disable=not progress, leave=False):
            order = torch.randperm(len(train_x), generator=gen).to(train_x.device, non_blocking=True)
            epoch_loss = torch.zeros((), device=train_x.device)
            for i in range(steps_per_epoch):
                idx = order[i * batch:(i + 1) * batch]
                sched.step_update(step)
                loss = F.cross_entropy(probe(train_x[idx]), train_y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                epoch_loss += loss.detach()
                step += 1
            check_probe_loss(epoch_loss.item() / steps_per_epoch, f"in epoch {epoch}", cfg.num_classes, desc,
                             cfg.linear_lr)
    probe.eval()
    with torch.no_grad(), cuda_eval_precision(test_x.device, autocast=False):
        # each epoch's loss is read before its updates: the last update is judged by the probe as it is tested
        final = sum(F.cross_entropy(probe(x), y, reduction="sum") for x, y in zip(train_x.split(4096),
                                                                                  train_y.split(4096)))
        check_probe_loss(final.item() / len(train_x), "after its last update", cfg.num_classes, desc, cfg.linear_lr)
        preds = torch.cat([probe(chunk).argmax(1) for chunk in test_x.split(4096)])
    return 100.0 * (preds == test_y).float().mean().item()


def linear_per_stage(feats: StageFeatures, cfg: EvalConfig, seed: int = 0, progress: bool = True) -> list[float]:
    """Linear-probe top-1 (percent) of every stage, each probe trained on its stage's features alone."""
    if int(feats.train_labels.max()) >= cfg.num_classes:
        raise ValueError(f"labels go up to {int(feats.train_labels.max())} but eval.num_classes = {cfg.num_classes}")
    return [train_linear_probe(a, feats.train_labels, b, feats.test_labels, cfg, seed, f"linear probe stage {k}",
                               progress)
            for k, (a, b) in enumerate(zip(feats.train, feats.test))]
