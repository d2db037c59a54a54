"""The boundary between two stages and the one stage loop every runner runs.

A boundary passes the residual stream into the next stage and scales the gradient that flows back
through it by alpha: 1 = global (end-to-end backprop), 0 = isolated (detached), in between = scaled.
`iter_stages` runs a range of stages with their boundaries, yielding after each stage: the model's
forward collects the losses, the stage-wise isolated step back-propagates each loss before the next
stage runs (so only one stage's graph is alive), and a pipeline rank runs its own range of stages.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from isolocal.config import Boundary


class GradScale(torch.autograd.Function):
    """Identity forward, gradient times alpha backward (the scaled boundary)."""

    @staticmethod
    def forward(ctx, x: Tensor, alpha: float) -> Tensor:
        ctx.alpha = alpha
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.alpha, None


def cross_boundary(x: Tensor, alpha: float, received: bool = False) -> Tensor:
    """Pass the residual stream into the next stage: alpha 1 = global, 0 = isolated (detached).

    `received`: x arrived from another pipeline rank. DeepSpeed's default schedule must send a gradient
    back for every float tensor a rank received, so there an isolated boundary lets zeros through
    instead of detaching.
    """
    if alpha == 1.0:
        return x
    if alpha == 0.0 and not (received and x.requires_grad):
        return x.detach()
    return GradScale.apply(x, alpha)


def parse_boundaries(spec: Boundary, count: int) -> list[float]:
    """'global' | 'isolated' | alpha | a list of those, one per boundary -> list of alphas."""
    items = spec if isinstance(spec, list) else [spec] * count
    if len(items) != count:
        raise ValueError(f"boundary list must have one entry per boundary ({count}), got {len(items)}: {spec}")
    alphas = []
    for item in items:
        if item == "global":
            alphas.append(1.0)
        elif item == "isolated":
            alphas.append(0.0)
        elif isinstance(item, (int, float)) and not isinstance(item, bool) and 0.0 <= item <= 1.0:
            alphas.append(float(item))
        else:
            raise ValueError(f"boundary {item!r} is not valid; use 'global', 'isolated' or an alpha in [0, 1]")
    return alphas


class StageResult(NamedTuple):
    """One stage's step: its index, its output (what the next stage receives across the boundary),
    its local loss, its head's prediction and its head's logs (scalars by name)."""

    index: int
    output: Tensor
    loss: Tensor
    pred: Any
    logs: dict[str, Any]


# (stage index, its input) -> (its output, its local loss, its head's prediction[, its head's logs])
RunStage = Callable[[int, Tensor], tuple]


def iter_stages(run_stage: RunStage, x: Tensor, alphas: Sequence[float], stages: Iterable[int],
                received: bool = False) -> Iterator[StageResult]:
    """Run consecutive `stages` on `x`, each behind its boundary (`alphas[k - 1]` in front of stage k > 0),
    yielding each stage's result before the next stage runs.

    A caller may back-propagate a yielded loss at once: an isolated boundary then detaches the next
    stage's input, so the stage's graph is freed before the next one is built. `received`: the first of
    `stages` gets its input from another pipeline rank (see `cross_boundary`).
    """
    for i, k in enumerate(stages):
        if k > 0:
            x = cross_boundary(x, alphas[k - 1], received=received and i == 0)
        x, loss, pred, *logs = run_stage(k, x)
        yield StageResult(k, x, loss, pred, logs[0] if logs else {})
