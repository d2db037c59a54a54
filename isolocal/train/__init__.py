"""Pre-training: the shared loop (`loop`), the single-process / data-parallel trainer, optimizers, logs.

`train(cfg)` runs the trainer; the DeepSpeed pipeline runner (`isolocal.train.pipeline.runner`) runs
the same loop, and `isolocal pretrain` picks between the two.
"""
from __future__ import annotations

from isolocal.train.trainer import Trainer, train

__all__ = ["Trainer", "train"]
