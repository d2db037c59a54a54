"""Pre-training: the trainer (global or stage-wise isolated, data parallel), optimizers, checkpoints."""
from isolocal.train.trainer import Trainer, train

__all__ = ["Trainer", "train"]
