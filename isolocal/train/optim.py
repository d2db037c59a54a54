"""AdamW with docs/method.md §7's weight-decay groups, and timm's per-iteration warmup + cosine.

Parameters are grouped per stage, so a stage can get its own learning-rate multiplier
(`train.stage_lr_scale`, applied by timm's scheduler through each group's `lr_scale`) or its own
optimizer (`train.per_stage_optimizers`, the shape a pipeline rank holding one stage needs).
"""
from __future__ import annotations

import torch
from timm.optim import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler
from torch import nn

from isolocal.config import ConfigError, TrainConfig


NO_DECAY_SUFFIXES = ("relative_position_bias_table",)  # 2-D, but excluded as timm's Swin `no_weight_decay` does


def scaled_lr(cfg: TrainConfig) -> float:
    """The linear scaling rule: lr = base_lr * global batch / 256."""
    return cfg.base_lr * cfg.batch_size / 256


def stage_param_groups(stages: nn.ModuleList, cfg: TrainConfig) -> list[list[dict]]:
    """Per stage: timm's groups (no weight decay on 1-D parameters, biases and Swin's relative position
    bias tables), tagged with the stage."""
    scales = cfg.stage_lr_scale or [1.0] * len(stages)
    if len(scales) != len(stages):
        raise ConfigError(
            f"train.stage_lr_scale has {len(scales)} values but the model has {len(stages)} stages"
        )
    if any(s <= 0 for s in scales):
        raise ConfigError(f"train.stage_lr_scale values must be > 0, got {scales}")
    per_stage = []
    for k, (stage, scale) in enumerate(zip(stages, scales)):
        no_decay = [n for n, _ in stage.named_parameters() if n.endswith(NO_DECAY_SUFFIXES)]
        groups = param_groups_weight_decay(stage, cfg.weight_decay, no_weight_decay_list=no_decay)
        per_stage.append([{**g, "lr_scale": scale, "stage": k} for g in groups])
    return per_stage


def build_optimizers(model: nn.Module, cfg: TrainConfig) -> list[torch.optim.AdamW]:
    """One AdamW over all stages, or one per stage when `per_stage_optimizers` is set."""
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    in_stages = {id(p) for p in model.stages.parameters() if p.requires_grad}
    if trainable != in_stages:
        raise ValueError("every trainable parameter must belong to a stage (model.stages)")
    per_stage = stage_param_groups(model.stages, cfg)
    lr, betas = scaled_lr(cfg), tuple(cfg.betas)
    if cfg.per_stage_optimizers:
        return [torch.optim.AdamW(groups, lr=lr, betas=betas) for groups in per_stage]
    return [torch.optim.AdamW([g for groups in per_stage for g in groups], lr=lr, betas=betas)]


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> CosineLRScheduler:
    """Linear warmup from 0 over `warmup_epochs`, then a half-cycle cosine to `min_lr`, per iteration.

    Call `step_update(step)` before optimizer step `step` (0-based): the lr is a pure function of the
    step, so a resumed run gets exactly the schedule of an uninterrupted one.
    """
    total = cfg.epochs * steps_per_epoch
    warmup = min(round(cfg.warmup_epochs * steps_per_epoch), total)
    return CosineLRScheduler(
        optimizer,
        t_initial=max(total - warmup, 1),
        lr_min=cfg.min_lr,
        warmup_t=warmup,
        warmup_lr_init=0.0,
        warmup_prefix=True,
        t_in_epochs=False,
    )
