"""Pipeline pre-training: `pretrain_pipeline(cfg)` runs in every process of a torchrun/deepspeed launch.

World = pipeline ranks x data-parallel replicas (DeepSpeed's `PipeDataParallelTopology`). In each
replica, the first pipeline rank reads images and draws masks exactly as the single-process trainer
does (same loader seed per epoch and replica, one mask generator per replica), so a one-replica
pipeline run with `pipeline.micro_batches` = the trainer's `train.accum_steps` sees the same
micro-batches; the last rank only needs dummy labels for DeepSpeed's loss call.

Logs are the trainer's: `metrics.jsonl` step/epoch records (every stage's loss, gradient norm and
lr gathered from the ranks that own them), `config.toml`; plus an `eval` record, the loss on fixed
held-out micro-batches (`eval_batches`), which a converted checkpoint must reproduce. Checkpoints are
DeepSpeed's (`<out_dir>/pipeline/<tag>/`, see `checkpoint.py`), saved every
`train.ckpt_every_epochs` and at the end; `resume=True` continues from the newest exactly (lr,
data order, masks and RNG states).

Failure: a rank that raises prints its error and exits at once (`os._exit`), which closes its
connections, so its peers fail within seconds (gloo "connection closed") instead of waiting in a
collective; the process-group timeout `pipeline.timeout_s` bounds any remaining wait.
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import sys
import time
import traceback
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from isolocal.config import ConfigError, RunConfig, to_dict
from isolocal.data import build_dataset, build_loader
from isolocal.models.mim import LocalMIM
from isolocal.pipeline.checkpoint import RUN_SUBDIR
from isolocal.train.distributed import gather_objects
from isolocal.train.metrics import MetricsLog, PeakMemory, write_config
from isolocal.train.optim import build_scheduler, scaled_lr, stage_param_groups
from isolocal.train.trainer import (_DATA_STREAM, _MASK_STREAM, build_train_dataset, derive_seed, resolve_amp,
                                    resolve_device, step_counts)

_EVAL_STREAM = 2  # masks of the held-out micro-batches (the trainer's streams: masks 0, data 1)


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
    if t.batch_size % (p.micro_batches * dp):
        raise ConfigError(f"train.batch_size ({t.batch_size}) must be divisible by pipeline.micro_batches "
                          f"({p.micro_batches}) x data-parallel replicas ({dp})")
    if t.accum_steps != 1:
        raise ConfigError(f"train.accum_steps must be 1 with a pipeline (got {t.accum_steps}); "
                          "the pipeline accumulates pipeline.micro_batches micro-batches per step")
    if t.amp == "fp16":
        raise ConfigError("train.amp = 'fp16' is not supported by the pipeline runner; use auto, bf16 or off")
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


def shutdown() -> None:
    """Barrier, then destroy: without both, gloo processes sometimes abort at interpreter exit."""
    dist.barrier()
    dist.destroy_process_group()


def eval_batches(cfg: RunConfig, model: LocalMIM, micro_batch: int, count: int) -> list[tuple[Tensor, Tensor]]:
    """`count` fixed held-out micro-batches (images, mask): eval transform, masks from the seed."""
    d, m = cfg.data, cfg.model
    dataset, _, _ = build_dataset(d.name, d.root or None, train=False, img_size=m.img_size, in_chans=m.in_chans,
                                  transform_train=False, synthetic_size=d.synthetic_size, seed=cfg.train.seed)
    if len(dataset) < micro_batch * count:
        raise ConfigError(f"the held-out set has {len(dataset)} images, fewer than one global batch "
                          f"({micro_batch * count}) for the pipeline's eval loss")
    gen = torch.Generator().manual_seed(derive_seed(cfg.train.seed, _EVAL_STREAM))
    loader = iter(build_loader(dataset, micro_batch, shuffle=False, seed=cfg.train.seed))
    images = [next(loader)[0] for _ in range(count)]
    return [(x, model.random_mask(len(x), generator=gen)) for x in images]


class PipelineRun:
    """One process's share of a pipeline pre-training run; `fit()` runs it."""

    def __init__(self, cfg: RunConfig, resume: bool = False, init: str | None = None):
        from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

        from isolocal.pipeline.engine import build_engine
        from isolocal.pipeline.module import MIMPipe

        t, p = cfg.train, cfg.pipeline
        self.cfg = cfg
        self.stages, self.dp = check_launch(cfg)
        self.device = resolve_device(t.device)
        init_distributed(self.device, p.timeout_s)
        self.rank = dist.get_rank()
        self.micro_batch = t.batch_size // (p.micro_batches * self.dp)
        self.out_dir = Path(cfg.out_dir)
        self.ckpt_root = self.out_dir / RUN_SUBDIR
        if not resume and (self.ckpt_root / "latest").exists():
            raise ValueError(f"{self.out_dir} already holds a pipeline run; resume it or choose another out_dir")

        torch.manual_seed(t.seed)  # every rank builds the same full model: the single-process init
        self.model = LocalMIM(cfg.model)
        if init is not None:
            from isolocal.checkpoint import load_model_state

            self.model.load_state_dict(load_model_state(init)[1])
        self.pipe = MIMPipe(self.model, PipeDataParallelTopology(num_pp=self.stages, num_dp=self.dp),
                            amp_dtype=resolve_amp(t.amp, self.device))
        grid = self.pipe.mpu()
        self.stage_id, self.replica = grid.get_stage_id(), grid.get_data_parallel_id()
        self.first, self.last = self.stage_id == 0, self.stage_id == self.stages - 1
        groups = stage_param_groups(self.model.stages, t)
        local = [g for k in self.pipe.stage_ids for g in groups[k]]
        optimizer = torch.optim.AdamW(local, lr=scaled_lr(t), betas=tuple(t.betas))
        self.engine = build_engine(self.pipe, optimizer, self.micro_batch, p.micro_batches, p.schedule, t.clip_grad)

        self.dataset = build_train_dataset(cfg)
        self.steps_per_epoch, self.total_steps = step_counts(t, len(self.dataset), self.dp, self.micro_batch,
                                                             p.micro_batches)
        self.scheduler = build_scheduler(optimizer, t, self.steps_per_epoch)
        self.mask_gen = torch.Generator().manual_seed(derive_seed(t.seed, _MASK_STREAM, self.replica))
        self.step = self.epoch = self.step_in_epoch = 0
        self.elapsed_before = 0.0
        self.saved_step = -1
        if resume:
            self._restore()
        self.log = MetricsLog(self.out_dir, enabled=self.rank == 0)
        if self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            write_config(cfg, self.out_dir)
            self.log.start(self.step if resume else None)
        self.memory = PeakMemory(self.device)

    @property
    def mode(self) -> str:
        return "isolated" if self.model.isolated else "global"

    # ------------------------------------------------------------------------------ the loop

    def fit(self) -> dict:
        t = self.cfg.train
        schedule = type(self.engine).__name__.removesuffix("Engine")
        bar = tqdm(total=self.total_steps, initial=self.step, disable=self.rank != 0, unit="step",
                   desc=f"pipeline {self.stages}x{self.dp} ({self.mode}, {schedule})", dynamic_ncols=True)
        self.memory.reset()
        self.start = last_log = time.perf_counter()
        logged_steps = 0
        epoch_sum, losses = torch.zeros(self.model.num_stages), torch.zeros(self.model.num_stages)
        while self.epoch < t.epochs and self.step < self.total_steps:
            epoch_start, epoch_first_step = time.perf_counter(), self.step
            for data in self._epoch_steps():
                self.scheduler.step_update(self.step)
                self.engine.train_batch(data)
                losses = self.pipe.pop_loss_sums().cpu()
                epoch_sum += losses
                logged_steps += 1
                if self.step % t.log_every == 0:
                    now = time.perf_counter()
                    rec = self._record("step", losses, now - last_log, logged_steps)
                    bar.set_postfix(loss=f"{rec['loss']:.4f}")
                    last_log, logged_steps = now, 0
                self.step += 1
                self.step_in_epoch += 1
                bar.update()
                if self.step >= self.total_steps:
                    break
            if self.step_in_epoch == self.steps_per_epoch:
                steps_here = self.step - epoch_first_step  # all of the epoch's unless it was resumed
                self._record("epoch", epoch_sum / steps_here, time.perf_counter() - epoch_start, steps_here)
                epoch_sum.zero_()
                self.epoch, self.step_in_epoch = self.epoch + 1, 0
                if self.epoch % t.ckpt_every_epochs == 0 or self.epoch == t.epochs:
                    self.save()
        bar.close()
        if self.saved_step != self.step:
            self.save()
        final = self._gather(losses)[: self.model.num_stages]
        eval_loss = self.evaluate()
        return {"steps": self.step, "epochs_completed": self.epoch, "final_loss": math.fsum(final),
                "final_loss_stage": final, "eval_loss": eval_loss, "peak_mem_mb": self.memory.peak_mb(),
                "time": self._elapsed(), "out_dir": str(self.out_dir), "mode": self.mode, "rank": self.rank,
                "checkpoint": str(self.ckpt_root)}

    def _epoch_steps(self) -> Iterator[Iterator | None]:
        """Per step of the current epoch, the data iterator this rank hands to `train_batch`."""
        t, m = self.cfg.train, self.cfg.pipeline.micro_batches
        if not self.first:
            for _ in range(self.step_in_epoch, self.steps_per_epoch):
                yield _dummy_labels(m) if self.last else None
            return
        sampler = None
        if self.dp > 1:
            sampler = DistributedSampler(self.dataset, self.dp, self.replica, shuffle=True, seed=t.seed, drop_last=True)
            sampler.set_epoch(self.epoch)
        loader = build_loader(self.dataset, self.micro_batch, shuffle=sampler is None,
                              seed=derive_seed(t.seed, _DATA_STREAM, self.epoch, self.replica),
                              num_workers=self.cfg.data.num_workers, drop_last=True, sampler=sampler)
        images = (batch[0] for batch in loader)
        for step in range(self.steps_per_epoch):
            group = [next(images) for _ in range(m)]
            if step >= self.step_in_epoch:
                masks = [self.model.random_mask(len(x), generator=self.mask_gen) for x in group]
                yield iter([((x, mask.to(torch.uint8)), _LABEL) for x, mask in zip(group, masks)])

    def evaluate(self) -> float:
        """Mean loss on `eval_batches` (each replica its share); writes the `eval` record."""
        m = self.cfg.pipeline.micro_batches
        batches = eval_batches(self.cfg, self.model, self.micro_batch, m * self.dp)
        mine = batches[self.replica * m:(self.replica + 1) * m]
        data = iter([((x, mask.to(torch.uint8)), _LABEL) for x, mask in mine]) if self.first or self.last else None
        self.pipe.pop_loss_sums()
        self.engine.eval_batch(data, num_micro_batches=m)
        return self._record("eval", self.pipe.pop_loss_sums().cpu(), 0.0, 0)["loss"]

    # ------------------------------------------------------------------------------ logs

    def _gather(self, losses: Tensor) -> list[float]:
        """[loss (S), grad norm (S), lr (S)] per stage over all ranks; losses averaged per micro-batch."""
        S, m = self.model.num_stages, self.cfg.pipeline.micro_batches
        owned = torch.zeros(3, S)
        owned[0] = losses / (m * self.dp)
        if self.replica == 0:  # norms and lrs are the same on every replica: count them once
            owned[1] = self.engine.grad_norms if self.engine.grad_norms is not None else 0.0
            for g in self.engine.optimizer.param_groups:
                owned[2, g["stage"]] = g["lr"]
        owned = owned.to(self.device)
        dist.all_reduce(owned)
        return owned.flatten().tolist()

    def _record(self, kind: str, losses: Tensor, seconds: float, steps: int) -> dict:
        """A log record with every stage's values; every rank calls it, rank 0 writes it."""
        S = self.model.num_stages
        values = self._gather(losses)
        peak = torch.tensor([self.memory.peak_mb()], device=self.device)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        group = self.engine.optimizer.param_groups[0]
        rec = {"kind": kind, "step": self.step, "epoch": self.epoch, "loss": math.fsum(values[:S]),
               "loss_stage": values[:S], "lr": group["lr"] / group["lr_scale"], "lr_stage": values[2 * S:],
               "grad_norm_stage": values[S:2 * S],
               "img_per_s": steps * self.cfg.train.batch_size / seconds if seconds > 0 else None,
               "peak_mem_mb": float(peak), "time": self._elapsed()}
        self.log.write(rec)
        return rec

    def _elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.start

    # ------------------------------------------------------------------------------ checkpoints

    def save(self) -> None:
        """A DeepSpeed checkpoint of every rank's stages and optimizer, plus the run state."""
        state = {"config": to_dict(self.cfg), "step": self.step, "epoch": self.epoch,
                 "step_in_epoch": self.step_in_epoch, "elapsed": self._elapsed(), "world_size": dist.get_world_size(),
                 "rng": gather_objects({"mask_generator": self.mask_gen.get_state(), "torch": torch.get_rng_state()},
                                       dist.get_world_size())}
        self.engine.save_checkpoint(str(self.ckpt_root), tag=f"step_{self.step:08d}", client_state=state)
        self.saved_step = self.step
        dist.barrier()
        if self.rank == 0:
            tags = sorted(p for p in self.ckpt_root.iterdir() if p.is_dir() and p.name.startswith("step_"))
            for old in tags[:-self.cfg.train.keep_last]:
                shutil.rmtree(old)

    def _restore(self) -> None:
        _, state = self.engine.load_checkpoint(str(self.ckpt_root))
        if state is None:
            raise FileNotFoundError(f"no pipeline checkpoint to resume in {self.ckpt_root}")
        saved, model = state["config"].get("model"), to_dict(self.cfg.model)
        if saved != model:
            raise ValueError(f"cannot resume: model config differs from the checkpoint's in "
                             f"{', '.join(sorted(k for k in model if saved.get(k) != model[k]))}")
        if state["world_size"] != dist.get_world_size():
            raise ValueError(f"cannot resume exactly: the checkpoint was written by {state['world_size']} "
                             f"processes, this run has {dist.get_world_size()}")
        self.step, self.epoch, self.step_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
        self.elapsed_before = state["elapsed"]
        self.saved_step = self.step
        mine = state["rng"][self.rank]
        self.mask_gen.set_state(mine["mask_generator"])
        torch.set_rng_state(mine["torch"])


_LABEL = torch.zeros(1)  # DeepSpeed hands labels to the loss on the last rank; the MIM loss needs none


def _dummy_labels(count: int) -> Iterator:
    return iter([(None, _LABEL)] * count)


@contextlib.contextmanager
def exit_on_failure() -> Iterator[None]:
    """Inside a process group, any exception prints and ends this process at once (see module docstring)."""
    try:
        yield
    except BaseException as err:  # noqa: BLE001 - a failing rank must not linger in a collective
        if not dist.is_initialized():
            raise
        print(f"{traceback.format_exc()}\nisolocal pipeline: rank {dist.get_rank()} of {dist.get_world_size()} "
              f"failed: {type(err).__name__}: {err}\n(an error about a closed or reset connection means another "
              "rank failed first: its log has the cause)", file=sys.stderr, flush=True)
        os._exit(1)


def pretrain_pipeline(cfg: RunConfig, resume: bool = False, init: str | None = None) -> dict:
    """Pre-train `cfg` as a pipeline of `cfg.pipeline.stages` ranks; call it in every launched process.

    `init`: a checkpoint (single-process file or pipeline directory) to start from. Returns the
    trainer's summary dict (plus `eval_loss`, `rank`, `checkpoint`) on every rank.
    """
    check_launch(cfg)
    if resolve_device(cfg.train.device).type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed is first imported
    with exit_on_failure():
        summary = PipelineRun(cfg, resume, init).fit()
        shutdown()
    return summary
