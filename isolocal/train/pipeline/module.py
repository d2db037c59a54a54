"""A DeepSpeed `PipelineModule` made of a stage-wise encoder's own stages: one pipeline layer per stage.

The layers are the model's stage modules themselves, so a pipeline run starts from exactly the
weights a single-process run of the same seed starts from, and a layer's checkpoint keys are the
stage's keys (`layer_03` <-> `stages.3.`).

What travels between pipeline ranks (DeepSpeed's rules for it are in docs/pipeline.md):
    (x, losses, images, mask[, labels])
- x: the residual stream (float, the only tensor whose gradient matters across a boundary);
- losses: one slot per stage, each stage adds its local loss; the last rank's loss is their sum,
  which is how every local loss reaches the optimizer under DeepSpeed's default schedule;
- images: int32 bit view of the float images, so DeepSpeed neither asks for their gradient nor
  corrupts them; each rank computes its own stages' targets from them (smaller than carrying targets)
  and hands them to its heads that need the image (`infopro`);
- mask: uint8;
- labels: int64, one per sample, only when a head needs them (`classify`, `dgl`, `infopro`, `auglocal`).
Float tensors come first: with 3+ ranks DeepSpeed indexes gradient buffers among float tensors
only, and a float tensor after an int one receives garbage. The first rank's input is
(images, mask) straight from the loader.
"""
from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator

import torch
from deepspeed.pipe import PipelineModule
from deepspeed.runtime.pipe.topology import ProcessTopology
from deepspeed.runtime.utils import partition_balanced
from torch import Tensor

from isolocal.models.encoder import StagewiseEncoder
from isolocal.train.logs import HeadLogs
from isolocal.train.pipeline.timing import RankTimes


def balanced_parts(model: StagewiseEncoder, ranks: int) -> list[int]:
    """Stage boundaries for `ranks` pipeline ranks, balancing parameter counts (contiguous stages)."""
    counts = [sum(p.numel() for p in stage.parameters() if p.requires_grad) for stage in model.stages]
    return partition_balanced(counts, ranks)


def check_parts(parts: list[int], num_stages: int, ranks: int) -> None:
    if (len(parts) != ranks + 1 or parts[0] != 0 or parts[-1] != num_stages
            or any(b <= a for a, b in zip(parts, parts[1:]))):
        raise ValueError(
            f"pipeline parts {parts} must be {ranks + 1} increasing stage indices from 0 to {num_stages} "
            f"(rank r runs stages parts[r] .. parts[r+1]-1), e.g. {list(range(ranks)) + [num_stages]}"
        )


def total_loss(outputs: tuple[Tensor, ...], labels: object) -> Tensor:
    """DeepSpeed's loss on the last rank: the sum of every stage's local loss."""
    return outputs[1].sum()


class StagePipe(PipelineModule):
    """The pipeline form of a stage-wise encoder; this rank holds stages `self.stage_ids`."""

    def __init__(self, model: StagewiseEncoder, topology: ProcessTopology, parts: list[int] | None = None,
                 amp_dtype: torch.dtype | None = None):
        ranks = topology.get_dim("pipe")
        if not 1 <= ranks <= model.num_stages:
            raise ValueError(f"pipeline stages must be between 1 and the model's {model.num_stages} stages, "
                             f"got {ranks}")
        parts = balanced_parts(model, ranks) if parts is None else list(parts)
        check_parts(parts, model.num_stages, ranks)
        # Plain attributes, set before PipelineModule.__init__ partitions and builds: the model is
        # shared (its stages become this module's layers), not a submodule with duplicate weights.
        object.__setattr__(self, "model", model)
        self.requested_parts = parts
        self.amp_dtype = amp_dtype
        super().__init__(layers=list(model.stages), topology=topology, loss_fn=total_loss,
                         partition_method="explicit")
        self.stage_ids = list(range(self._local_start, self._local_stop))
        # Buffers (not saved) so that they follow the module to DeepSpeed's device: the per-step loss
        # sums and the stage indices `forward` adds losses at stay there, and no step waits on the host.
        self.register_buffer("loss_sums", torch.zeros(model.num_stages), persistent=False)
        self.register_buffer("stage_index", torch.arange(model.num_stages), persistent=False)
        self.pending_loss: Tensor | None = None
        self.head_logs = HeadLogs()  # this rank's heads' logs since the runner last cleared them
        self.host_masks: deque[Tensor] = deque()  # the first rank's loader masks, in load order (`batches`)
        self.times: RankTimes | None = None  # set by a profiled run: target computation is timed

    def _partition_layers(self, method: str = "explicit") -> None:
        self.parts = self.requested_parts
        stage = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])

    def forward(self, carry: tuple[Tensor, ...], backward: Callable[[Tensor], None] | None = None
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Run this rank's stages on one micro-batch: the model's stage loop (`StagewiseEncoder.stages_of`),
        its first stage's input received from the previous rank (see `isolocal.core.stages.cross_boundary`).

        With `backward` (the isolated schedule) every stage but the last one here is back-propagated
        right after its forward, freeing its graph; the last one's loss is left in `pending_loss`
        so the caller can send the activations first.
        """
        if self._local_start == 0:
            images, mask, *labels = carry
            known = self.host_masks.popleft() if self.host_masks else mask  # see `batches`
            x = images
            losses = torch.zeros(self.model.num_stages, device=images.device)
        else:
            x, losses, bits, mask, *labels = carry
            images = bits.view(torch.float32)
            known = mask
        with self.times.span("targets") if self.times is not None else contextlib.nullcontext():
            batch = self.model.prepare(images, known.bool(), self.stage_ids, labels=labels[0] if labels else None)
        for stage in self.model.stages_of(x, batch, self.stage_ids, received=True,
                                          autocast=lambda: self._autocast(images.device.type)):
            k = stage.index
            self.loss_sums[k] += stage.loss.detach()
            self.head_logs.add(k, stage.logs)
            losses = losses.index_add(0, self.stage_index[k:k + 1], stage.loss.reshape(1))
            if backward is not None and k != self.stage_ids[-1]:
                backward(stage.loss)
        self.pending_loss = stage.loss
        return stage.output, losses, _bits(images), mask, *labels

    def batches(self, micro: Iterable[tuple[Tensor, Tensor]], label: Tensor) -> Iterator[tuple]:
        """The first rank's `train_batch` / `eval_batch` input, ((images, uint8 mask), label) per
        micro-batch. DeepSpeed copies both to the device; the host mask is also kept for `forward`
        (DeepSpeed loads a micro-batch right before its forward), which hands it to `prepare`: Swin
        plans its windows from it instead of copying the device mask back (a sync per micro-batch)."""
        self.host_masks.clear()
        for images, mask, *labels in micro:
            self.host_masks.append(mask)
            yield (images, mask.to(torch.uint8), *labels), label

    def _autocast(self, device_type: str) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type, self.amp_dtype)

    def pop_loss_sums(self) -> Tensor:
        """Sum of each local stage's loss since the last call (zeros for other ranks' stages)."""
        sums, self.loss_sums = self.loss_sums, torch.zeros_like(self.loss_sums)
        return sums

    def stage_parameters(self) -> dict[int, list[torch.nn.Parameter]]:
        """Trainable parameters of each local stage."""
        return {k: [p for p in self.model.stages[k].parameters() if p.requires_grad] for k in self.stage_ids}


def _bits(images: Tensor) -> Tensor:
    if images.dtype != torch.float32:
        raise ValueError(f"pipeline images must be float32, got {images.dtype}")
    return images.contiguous().view(torch.int32)
