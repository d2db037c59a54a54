"""Forward + backward of one micro-batch, global or stage-wise isolated, and per-stage gradient
clipping: the step pieces every runner shares.

Global (some boundary lets gradient through): one forward of the whole model, one backward of the
summed loss. Isolated (every boundary detached, several stages): stage by stage, forward, backward of
that stage's loss, then the detached output feeds the next stage, so each stage's graph is freed
before the next one is built and peak activation memory is about one stage's.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from isolocal.models.encoder import LocalMIM

Scale = Callable[[Tensor], Tensor]


def is_stagewise(model: LocalMIM) -> bool:
    """Stage-wise backward is exact only when no gradient crosses any boundary."""
    return model.isolated and model.num_stages > 1


def backward_step(model: LocalMIM, images: Tensor, mask: Tensor, scale: Scale = lambda x: x, accum: int = 1,
                  autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                  stage_done: Callable[[int], None] | None = None, labels: Tensor | None = None) -> Tensor:
    """Accumulate gradients of one micro-batch (losses divided by `accum`, then `scale`d, e.g. by a
    GradScaler); returns the detached per-stage losses divided by `accum`. Stage-wise, `stage_done(k)`
    runs right after stage k's backward, when its gradients are final for this micro-batch (the
    trainer launches that stage's data-parallel all-reduce there, overlapping the later stages).
    `labels`: one per sample, for heads that need them (`LocalMIM.prepare`)."""
    if not is_stagewise(model):
        with autocast():
            out = model(images, mask, labels=labels)
        scale(out.loss / accum).backward()
        return torch.stack(out.losses).detach().float() / accum
    with autocast():
        batch = model.prepare(images, mask, labels=labels)
    x, losses = images, []
    for k in range(model.num_stages):
        with autocast():
            x, loss, _ = model.stage_step(k, x, batch)
        scale(loss / accum).backward()  # frees stage k's graph before stage k+1 runs
        if stage_done is not None:
            stage_done(k)
        x = x.detach()
        losses.append(loss.detach().float())
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


def compile_stages(model: LocalMIM, backend: str | Callable = "inductor") -> None:
    """`torch.compile` every stage's training forward and head in place (`LocalMIM.compile_stages`: one
    static graph per stage, eval runs eager, Swin warns and stays eager); state-dict keys stay the same."""
    model.compile_stages(backend)
