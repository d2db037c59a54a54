"""Linear probes, one per stage, on a frozen encoder (MAE's protocol, He et al. 2022).

The head is BatchNorm1d without affine parameters followed by a Linear layer (weights N(0, 0.01)):
the parameter-free BatchNorm puts every stage's features on one scale, so a single learning rate
fits all stages. Features are extracted once, so the encoder is never in the graph and cannot
change; the probe then trains for many epochs in seconds.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import timm.optim
import torch
import torch.nn.functional as F
from timm.scheduler import CosineLRScheduler
from torch import Tensor, nn
from torch.optim import Optimizer

from isolocal.core.progress import progress_bar
from isolocal.config import EvalConfig
from isolocal.eval.features import SplitFeatures, cuda_eval_precision


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


@dataclass
class FittedProbe:
    """A stage's probe at the epoch with the best validation top-1 (the earliest among equals)."""

    probe: LinearProbe
    val_top1: float
    epoch: int
    val_history: list[float]  # every epoch's validation top-1


@torch.no_grad()
def probe_top1(probe: nn.Module, x: Tensor, y: Tensor) -> float:
    """Top-1 in percent of `probe` on features `x` (probe in eval mode, chunks of 4096)."""
    probe.eval()
    with cuda_eval_precision(x.device, autocast=False):
        preds = torch.cat([probe(chunk).argmax(1) for chunk in x.split(4096)])
    return 100.0 * (preds == y).float().mean().item()


@torch.no_grad()
def _mean_loss(probe: nn.Module, x: Tensor, y: Tensor) -> float:
    probe.eval()
    with cuda_eval_precision(x.device, autocast=False):
        total = sum(F.cross_entropy(probe(a), b, reduction="sum") for a, b in zip(x.split(4096), y.split(4096)))
    return total.item() / len(x)


def fit_linear_probe(train_x: Tensor, train_y: Tensor, val_x: Tensor, val_y: Tensor, cfg: EvalConfig,
                     seed: int = 0, desc: str = "linear probe", progress: bool = True) -> FittedProbe:
    """Train one probe on precomputed features for `eval.linear_epochs`, scoring it on the validation
    features after every epoch; returns it at its best validation epoch."""
    check_optimizer(cfg.linear_optimizer)
    gen = torch.Generator().manual_seed(seed)
    probe = LinearProbe(train_x.shape[1], cfg.num_classes, gen).to(train_x.device)
    opt = timm.optim.create_optimizer_v2(probe, opt=cfg.linear_optimizer, lr=cfg.linear_lr, weight_decay=0.0,
                                         momentum=0.9)
    batch = min(cfg.linear_batch_size, len(train_x))
    steps_per_epoch = max(1, len(train_x) // batch)  # full batches only: BatchNorm needs > 1 sample
    sched = cosine_scheduler(opt, cfg.linear_epochs, steps_per_epoch, cfg.warmup_epochs)
    best: FittedProbe | None = None
    history: list[float] = []
    step = 0
    for epoch in progress_bar(range(cfg.linear_epochs), desc=desc, disable=not progress, leave=False):
        probe.train()
        order = torch.randperm(len(train_x), generator=gen).to(train_x.device, non_blocking=True)
        epoch_loss = torch.zeros((), device=train_x.device)
        with cuda_eval_precision(train_x.device, autocast=False):  # TF32 on CUDA; the loss is read once per epoch
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
        history.append(probe_top1(probe, val_x, val_y))
        if best is None or history[-1] > best.val_top1:
            best = FittedProbe(copy.deepcopy(probe), history[-1], epoch, history)
    # each epoch's loss is read before its updates: the kept probe is judged as it will be tested
    check_probe_loss(_mean_loss(best.probe, train_x, train_y), f"at its kept epoch {best.epoch}", cfg.num_classes,
                     desc, cfg.linear_lr)
    return best


def linear_per_stage(train: SplitFeatures, val: SplitFeatures, cfg: EvalConfig, seed: int = 0,
                     progress: bool = True) -> list[FittedProbe]:
    """One probe per stage, each trained on its stage's features alone and kept at its best validation epoch."""
    if int(train.labels.max()) >= cfg.num_classes:
        raise ValueError(f"labels go up to {int(train.labels.max())} but eval.num_classes = {cfg.num_classes}")
    return [fit_linear_probe(a, train.labels, b, val.labels, cfg, seed, f"linear probe stage {k}", progress)
            for k, (a, b) in enumerate(zip(train.stages, val.stages))]
