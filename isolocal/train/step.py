"""Forward + backward of one micro-batch, global or stage-wise isolated, and per-stage gradient
clipping: the step pieces every runner shares.

Global (some boundary lets gradient through): one forward of the whole model, one backward of the
summed loss. Isolated (every boundary detached, several stages): the model's stage loop
(`StagewiseEncoder.stages_of`) with each stage's loss back-propagated as soon as the stage has run;
its detached output then feeds the next stage, so each stage's graph is freed before the next one is
built and peak activation memory is about one stage's.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from isolocal.models.encoder import StagewiseEncoder
from isolocal.train.logs import HeadLogs

Scale = Callable[[Tensor], Tensor]


def is_stagewise(model: StagewiseEncoder) -> bool:
    """Stage-wise backward is exact only when no gradient crosses any boundary."""
    return model.isolated and model.num_stages > 1


def backward_step(model: StagewiseEncoder, images: Tensor, mask: Tensor | None, scale: Scale = lambda x: x,
                  accum: int = 1, autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                  stage_done: Callable[[int], None] | None = None, labels: Tensor | None = None,
                  logs: HeadLogs | None = None) -> Tensor:
    """Accumulate gradients of one micro-batch (losses divided by `accum`, then `scale`d, e.g. by a
    GradScaler); returns the detached per-stage losses divided by `accum`. Stage-wise, `stage_done(k)`
    runs right after stage k's backward, when its gradients are final for this micro-batch (the
    trainer launches that stage's data-parallel all-reduce there, overlapping the later stages).
    `labels`: one per sample, for heads that need them (`StagewiseEncoder.prepare`); `mask`: None when no
    head needs one. `logs` collects the heads' logs."""
    if not is_stagewise(model):
        with autocast():
            out = model(images, mask, labels=labels)
        scale(out.loss / accum).backward()
        if logs is not None:
            for k, stage_logs in enumerate(out.logs):
                logs.add(k, stage_logs)
        return torch.stack(out.losses).detach().float() / accum
    with autocast():
        batch = model.prepare(images, mask, labels=labels)
    losses = []
    for stage in model.stages_of(images, batch, autocast=autocast):
        scale(stage.loss / accum).backward()  # frees this stage's graph before the next one runs
        if stage_done is not None:
            stage_done(stage.index)
        if logs is not None:
            logs.add(stage.index, stage.logs)
        losses.append(stage.loss.detach().float())
    return torch.stack(losses) / accum


def clip_stage_gradients(stage_params: Sequence[Sequence[torch.nn.Parameter]], max_norm: float) -> Tensor:
    """Each stage's gradient norm (stacked, left on the device), each stage clipped to `max_norm` on its
    own norm when `max_norm` > 0: stages never share a norm, which would couple isolated stages."""
    norms = []
    for params in stage_params:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        if max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        norms.append(norm)
    return torch.stack(norms)

