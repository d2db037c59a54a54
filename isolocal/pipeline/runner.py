"""Pipeline pre-training: `pretrain_pipeline(cfg)` runs in every process of a torchrun/deepspeed launch.

World = pipeline ranks x data-parallel replicas (DeepSpeed's `PipeDataParallelTopology`). In each
replica, the first pipeline rank reads the loop's micro-batches (the trainer's, for
`pipeline.micro_batches` = `train.accum_steps`); the last rank only needs dummy labels for
DeepSpeed's loss call; each rank computes the targets of its own stages only.

The loop, its micro-batches, logs, checkpoint schedule and resume checks are the trainer's
(`isolocal.train.loop`); this module supplies the pipeline's step (`engine.train_batch`), its per-stage
values (every stage's loss, gradient norm and lr gathered from the ranks that own them) and its
checkpoints: DeepSpeed's (`<out_dir>/pipeline/<tag>/`, see `isolocal.checkpoint`), the loop's state
as their client state. After training, an `eval` record holds the loss on fixed held-out
micro-batches (`eval_batches`), which a converted checkpoint must reproduce.

Failure: a rank that raises prints its error and exits at once (`os._exit`), which closes its
connections, so its peers fail within seconds (gloo "connection closed") instead of waiting in a
collective; the process-group timeout `pipeline.timeout_s` bounds any remaining wait.
"""
from __future__ import annotations

import contextlib
import os
import sys
import traceback
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from isolocal.checkpoint import PIPELINE_DIR, prune_pipeline_tags
from isolocal.config import ConfigError, RunConfig
from isolocal.data import build_dataset, build_loader
from isolocal.device import resolve_amp, resolve_device
from isolocal.errors import NonFiniteError, RunInterrupted
from isolocal.models.mim import LocalMIM
from isolocal.train.distributed import DistInfo, shutdown
from isolocal.train.loop import (EVAL_STREAM, MicroBatches, PretrainLoop, StageValues, build_model, derive_seed,
                                 micro_batch_size)
from isolocal.train.optim import build_scheduler, scaled_lr, stage_param_groups

_SPLIT = ("pipeline.micro_batches", "data-parallel replicas")  # how train.batch_size is split


def check_launch(cfg: RunConfig) -> tuple[int, int]:
    """(pipeline ranks, data-parallel replicas) from the launcher's environment, or a clear error."""
    p, t = cfg.pipeline, cfg.train
    if "WORLD_SIZE" not in os.environ or "LOCAL_RANK" not in os.environ:
        raise ConfigError("pipeline training runs one process per rank: launch with `torchrun --nproc-per-node N "
                          "...` or `deepspeed --num_gpus N ...` (WORLD_SIZE and LOCAL_RANK are not set)")
    world = int(os.environ["WORLD_SIZE"])
    stages = len(cfg.model.taps)
    if not 1 <= p.stages <= stages:
        raise ConfigError(f"pipeline.stages must be between 1 and the model's {stages} stages, got {p.stages}")
    if world % p.stages:
        raise ConfigError(f"the launch has {world} processes, not a multiple of pipeline.stages ({p.stages})")
    dp = world // p.stages
    micro_batch_size(t, p.micro_batches, dp, _SPLIT)
    if t.accum_steps != 1:
        raise ConfigError(f"train.accum_steps must be 1 with a pipeline (got {t.accum_steps}); "
                          "the pipeline accumulates pipeline.micro_batches micro-batches per step")
    if t.amp == "fp16":
        raise ConfigError("train.amp = 'fp16' is not supported by the pipeline runner; use auto, bf16 or off")
    if t.compile:
        raise ConfigError("train.compile = true is not supported by the pipeline runner (its stages run eager); "
                          "set train.compile = false or train with `isolocal pretrain`")
    return p.stages, dp


def init_distributed(device: torch.device, timeout_s: int) -> None:
    """DeepSpeed's process group with a bounded timeout, without JIT-building the unused shm op."""
    import deepspeed
    from deepspeed.utils import logger

    deepspeed.ops.__compatible_ops__ = {"deepspeed_shm_comm": False}  # the only switch (private); saves ~20 s
    logger.setLevel("WARNING")
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    deepspeed.init_distributed("nccl" if device.type == "cuda" else "gloo",
                               timeout=timedelta(seconds=timeout_s), verbose=False)


def eval_batches(cfg: RunConfig, model: LocalMIM, micro_batch: int, count: int) -> list[tuple[Tensor, Tensor]]:
    """`count` fixed held-out micro-batches (images, mask): eval transform, masks from the seed."""
    d, m = cfg.data, cfg.model
    dataset, _, _ = build_dataset(d.name, d.root or None, train=False, img_size=m.img_size, in_chans=m.in_chans,
                                  transform_train=False, synthetic_size=d.synthetic_size, seed=cfg.train.seed)
    if len(dataset) < micro_batch * count:
        raise ConfigError(f"the held-out set has {len(dataset)} images, fewer than one global batch "
                          f"({micro_batch * count}) for the pipeline's eval loss")
    gen = torch.Generator().manual_seed(derive_seed(cfg.train.seed, EVAL_STREAM))
    loader = iter(build_loader(dataset, micro_batch, shuffle=False, seed=cfg.train.seed))
    images = [next(loader)[0] for _ in range(count)]
    return [(x, model.random_mask(len(x), generator=gen)) for x in images]


class PipelineRun(PretrainLoop):
    """One process's share of a pipeline pre-training run; `fit()` runs it."""

    FIXED_ON_RESUME = (*PretrainLoop.FIXED_ON_RESUME, "pipeline.stages", "pipeline.micro_batches")

    def __init__(self, cfg: RunConfig, resume: bool = False, init: str | None = None):
        t, p = cfg.train, cfg.pipeline
        self.cfg = cfg
        self.stages, self.dp = check_launch(cfg)
        self.device = resolve_device(t.device)
        self.ckpt_root = self.resume_path = Path(cfg.out_dir) / PIPELINE_DIR
        saved = self._open(resume, self.stages * self.dp)  # a refused resume fails before DeepSpeed starts
        self._prepare_data(self.dp, p.micro_batches, _SPLIT)

        from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

        from isolocal.pipeline.engine import build_engine
        from isolocal.pipeline.module import MIMPipe

        init_distributed(self.device, p.timeout_s)
        self.dist = DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"]))

        self.model = build_model(cfg, init)  # every rank builds the same full model: the single-process init
        self.pipe = MIMPipe(self.model, PipeDataParallelTopology(num_pp=self.stages, num_dp=self.dp),
                            amp_dtype=resolve_amp(t.amp, self.device))
        grid = self.pipe.mpu()
        self.stage_id, replica = grid.get_stage_id(), grid.get_data_parallel_id()
        self.first, self.last = self.stage_id == 0, self.stage_id == self.stages - 1
        groups = stage_param_groups(self.model.stages, t)
        local = [g for k in self.pipe.stage_ids for g in groups[k]]
        optimizer = torch.optim.AdamW(local, lr=scaled_lr(t), betas=tuple(t.betas))
        self.engine = build_engine(self.pipe, optimizer, self.micro_batch, p.micro_batches, p.schedule, t.clip_grad)
        self.optimizers = [self.engine.optimizer]
        self.scheduler = build_scheduler(optimizer, t, self.steps_per_epoch)
        self._start(saved, replica, loads_data=self.first, loss_device=self.device)

    @property
    def description(self) -> str:
        schedule = type(self.engine).__name__.removesuffix("Engine")
        return f"pipeline {self.stages}x{self.dp} ({self.mode}, {schedule})"

    def fit(self) -> dict:
        """The loop, then the held-out eval loss; the summary adds `eval_loss`, `rank`, `checkpoint`."""
        summary = super().fit()
        return {**summary, "eval_loss": self.evaluate(), "rank": self.dist.rank, "checkpoint": str(self.ckpt_root)}

    # ------------------------------------------------------------------------------ the step

    def train_step(self, micro: MicroBatches | None) -> Tensor:
        """One `train_batch` -> this rank's per-stage loss sums over its micro-batches (zero for the
        stages of other ranks)."""
        self.scheduler.step_update(self.step)
        self.engine.train_batch(self._feed(micro))
        return self.pipe.pop_loss_sums()

    def _feed(self, micro: MicroBatches | None) -> Iterator | None:
        """What this rank's `train_batch` / `eval_batch` reads: the first rank (images, mask), the last
        rank labels for DeepSpeed's loss call (the MIM loss needs none), middle ranks nothing."""
        if self.first:
            return self.pipe.batches(micro, _LABEL)
        return iter([(None, _LABEL)] * self.cfg.pipeline.micro_batches) if self.last else None

    def stage_values(self, losses: Tensor) -> StageValues:
        """Per stage, over all ranks: loss averaged per micro-batch, gradient norm and lr."""
        S, m = self.model.num_stages, self.cfg.pipeline.micro_batches
        owned = torch.zeros(3, S, device=self.device)
        owned[0] = losses / (m * self.dp)
        if self.replica == 0:  # norms and lrs are the same on every replica: count them once
            owned[1] = self.engine.grad_norms if self.engine.grad_norms is not None else 0.0
            for g in self.engine.optimizer.param_groups:
                owned[2, g["stage"]] = g["lr"]
        dist.all_reduce(owned)
        loss, grad_norm, lr = owned.tolist()
        return StageValues(loss, grad_norm, lr)

    def step_grad_norms(self) -> Tensor:
        return self.engine.grad_norms if self.engine.grad_norms is not None else torch.zeros(self.model.num_stages)

    def evaluate(self) -> float:
        """Mean loss on `eval_batches` (each replica its share); writes the `eval` record."""
        m = self.cfg.pipeline.micro_batches
        batches = eval_batches(self.cfg, self.model, self.micro_batch, m * self.dp)
        self.pipe.pop_loss_sums()
        self.engine.eval_batch(self._feed(batches[self.replica * m:(self.replica + 1) * m]), num_micro_batches=m)
        return self._log("eval", self.step, self.pipe.pop_loss_sums(), 0.0, 0)["loss"]

    # ------------------------------------------------------------------------------ checkpoints

    def write_checkpoint(self, state: dict) -> None:
        """A DeepSpeed checkpoint of every rank's stages and optimizer, the loop's state as client state."""
        self.engine.save_checkpoint(str(self.ckpt_root), tag=f"step_{self.step:08d}", client_state=state)
        dist.barrier()
        if self.dist.main:
            prune_pipeline_tags(self.ckpt_root, self.cfg.train.keep_last)

    def load_runner_state(self, saved: dict) -> None:
        self.engine.load_checkpoint(str(self.ckpt_root))


_LABEL = torch.zeros(1)  # DeepSpeed hands labels to the loss on the last rank; the MIM loss needs none


@contextlib.contextmanager
def exit_on_failure() -> Iterator[None]:
    """Inside a process group, any exception prints and ends this process at once (see module docstring)."""
    try:
        yield
    except (RunInterrupted, NonFiniteError):  # every rank raises it at the same step: end together
        if dist.is_initialized():
            shutdown()
        raise
    except BaseException as err:  # noqa: BLE001 - a failing rank must not linger in a collective
        if not dist.is_initialized():
            raise
        print(f"{traceback.format_exc()}\nisolocal pipeline: rank {dist.get_rank()} of {dist.get_world_size()} "
              f"failed: {type(err).__name__}: {err}\n(an error about a closed or reset connection means another "
              "rank failed first: its log has the cause)", file=sys.stderr, flush=True)
        os._exit(1)


def pretrain_pipeline(cfg: RunConfig, resume: bool = False, init: str | None = None) -> dict:
    """Pre-train `cfg` as a pipeline of `cfg.pipeline.stages` ranks; call it in every launched process.

    `init`: any isolocal checkpoint or run directory to start from. Returns the trainer's summary dict
    (plus `eval_loss`, `rank`, `checkpoint`) on every rank, then ends the process group.
    """
    check_launch(cfg)
    if resolve_device(cfg.train.device).type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed is first imported
    with exit_on_failure():
        run = PipelineRun(cfg, resume, init)
        summary = run.fit()
        run.close()
        shutdown()
    return summary
