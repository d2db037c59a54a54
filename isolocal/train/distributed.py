"""Process groups for both runners, and data parallelism for the trainer: parameter broadcast,
gradient averaging, values reduced over ranks for the logs.

Gradients are averaged by hand (one flat all-reduce per stage once its local backwards of a step are
done; isolated stages launch theirs asynchronously right after their last backward) instead of
wrapping the model in DistributedDataParallel. DDP hooks `forward()` and expects one
backward per forward; the isolated trainer runs `stage_step` per stage with one backward each, and
accumulates micro-batches. The manual all-reduce is correct for every mode, and it runs once per
optimizer step, which is what DDP's `no_sync` + accumulation would do anyway.
"""
from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from isolocal.config import ConfigError
from isolocal.io.paths import atomic_write_text

TIMEOUT = timedelta(minutes=10)  # long enough for rank 0 to write a ViT-L checkpoint


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this trainer created the process group and must destroy it

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(device_type: str) -> DistInfo:
    """Join torchrun's process group when WORLD_SIZE > 1 (gloo on CPU, nccl on CUDA)."""
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return DistInfo()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=TIMEOUT)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, owns_group=True)


def shutdown() -> None:
    """Barrier, then destroy: without the barrier, gloo processes sometimes abort at interpreter exit."""
    dist.barrier()
    dist.destroy_process_group()


def teardown(info: DistInfo, barrier: bool = True) -> None:
    """End the process group this run created. After an error there is no barrier (the other ranks
    may never reach it)."""
    if info.owns_group and dist.is_initialized():
        if barrier:
            shutdown()
        else:
            dist.destroy_process_group()


def check_shared_dir(out_dir: Path, info: DistInfo) -> None:
    """Every rank must see what rank 0 writes in `out_dir`: a resume reads the checkpoint on every node.
    Rank 0 writes a token file, each rank reads it back; a ConfigError on every rank, naming the ranks
    (and hosts) that could not, before any training."""
    if info.world == 1:
        return
    token = [uuid.uuid4().hex if info.main else None]
    dist.broadcast_object_list(token)
    probe = out_dir / f".shared-{token[0]}"
    if info.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(probe, token[0])
    dist.barrier()
    seen = probe.is_file() and probe.read_text() == token[0]
    views = gather_objects((seen, socket.gethostname()), info.world)  # also waits for every rank's read
    if info.main:
        probe.unlink()
    blind = [f"rank {rank} (on {host})" for rank, (ok, host) in enumerate(views) if not ok]
    if blind:
        raise ConfigError(f"{', '.join(blind)} cannot see what rank 0 wrote to out_dir {out_dir}: every node "
                          "needs the same out_dir, on a file system they share")


def broadcast_parameters(model: nn.Module) -> None:
    """Start every rank from rank 0's weights (they match already when built from one seed)."""
    for tensor in list(model.parameters()) + list(model.buffers()):
        dist.broadcast(tensor.data, src=0)


class GradientAverager:
    """Average gradients over ranks, one flat all-reduce per parameter list (one list per stage),
    each launched asynchronously by `launch(k)` as soon as list k's gradients are final (in isolated
    mode right after stage k's last backward, while later stages still compute); `finish()` waits
    for them and writes the averages back. Launching all lists at the end gives the same numbers."""

    def __init__(self, param_lists: list[list[nn.Parameter]], world: int):
        self.param_lists, self.world = param_lists, world
        self.pending: dict[int, tuple[torch.Tensor, dist.Work]] = {}  # list index -> (flat sum, its reduce)

    def launch(self, k: int) -> None:
        for p in self.param_lists[k]:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in self.param_lists[k]])
        self.pending[k] = (flat, dist.all_reduce(flat, async_op=True))

    def finish(self) -> None:
        """Launch the lists not launched yet, wait for every reduce, write the averages back."""
        for k in range(len(self.param_lists)):
            if k not in self.pending:
                self.launch(k)
        for k, (flat, work) in self.pending.items():
            work.wait()
            flat /= self.world
            offset = 0
            for p in self.param_lists[k]:
                n = p.numel()
                p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
                offset += n
        self.pending = {}


def average_gradients(param_lists: list[list[nn.Parameter]], world: int) -> None:
    """Average gradients over ranks now: every list's all-reduce launched, then waited for."""
    GradientAverager(param_lists, world).finish()


def mean_over_ranks(values: torch.Tensor, world: int) -> torch.Tensor:
    """Mean of a small tensor across ranks (for logged losses)."""
    if world > 1:
        values = values.clone()
        dist.all_reduce(values)
        values /= world
    return values


def max_over_ranks(value: float, world: int, device: torch.device) -> float:
    """The largest of every rank's `value` (peak memory: the busiest rank is what must fit)."""
    if world == 1:
        return value
    values = torch.tensor([value], device=device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return float(values)


def gather_objects(obj: object, world: int) -> list:
    """Every rank's `obj`, in rank order (RNG states for checkpoints)."""
    if world == 1:
        return [obj]
    out: list = [None] * world
    dist.all_gather_object(out, obj)
    return out
