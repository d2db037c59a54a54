"""Gradient checkpointing of a stage's blocks (`train.grad_checkpoint`): the end-to-end memory baseline.

Every family's stage runs its blocks through `run_blocks`. With the stage's `grad_checkpointing` set
(timm's attribute name) and in a training forward, each block runs under non-reentrant
`torch.utils.checkpoint`: only block inputs are kept, a block's activations are recomputed in
backward. The numbers are the plain run's: dropout and drop path replay their RNG, and BatchNorm
recomputations update throw-away copies of the running statistics (one forward, one update).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

_BATCH_STATS = ("running_mean", "running_var", "num_batches_tracked")


@contextlib.contextmanager
def scratch_batch_stats(module: nn.Module) -> Iterator[None]:
    """BatchNorms in `module` update copies of their running statistics, dropped on exit (the originals
    are swapped back, not modified in place, so the recomputation runs the same ops on the same tensors)."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    kept = [[getattr(m, name) for name in _BATCH_STATS] for m in norms]
    for m, buffers in zip(norms, kept):
        for name, buffer in zip(_BATCH_STATS, buffers):
            setattr(m, name, buffer.clone())
    try:
        yield
    finally:
        for m, buffers in zip(norms, kept):
            for name, buffer in zip(_BATCH_STATS, buffers):
                setattr(m, name, buffer)


def run_blocks(stage: nn.Module, blocks: Iterable[nn.Module], x: Tensor, *args: Any) -> Tensor:
    """`x` through each of the stage's `blocks` in turn (`block(x, *args)`), each checkpointed when the
    stage's `grad_checkpointing` is set in a training forward with gradients."""
    if not (getattr(stage, "grad_checkpointing", False) and stage.training and torch.is_grad_enabled()):
        for block in blocks:
            x = block(x, *args)
        return x
    for block in blocks:
        x = checkpoint(block, x, *args, use_reentrant=False,
                       context_fn=lambda b=block: (contextlib.nullcontext(), scratch_batch_stats(b)))
    return x
