"""The single-process / data-parallel runner of the pre-training loop (`loop.py`): its step and state.

Each optimizer step takes `accum_steps` micro-batches (images and masks from the loop), then:
- global mode (some boundary lets gradient through): one forward of the whole model and one
  backward of the summed loss;
- isolated mode (`model.isolated`): stage by stage, forward, backward of that stage's loss, then the
  detached output feeds the next stage. Each stage's graph is freed by its backward before the next
  stage runs, so peak activation memory is about one stage's.
Both modes draw the same images and masks in the same order, so their runs are comparable step by
step. Under torchrun (WORLD_SIZE > 1) gradients are averaged across ranks before the optimizer step
(see `distributed.py`); rank 0 writes logs and checkpoints (`<out_dir>/last.pt`, `epoch_NNNN.pt`).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from isolocal.io.checkpoint import LAST, check_fits, save_checkpoint
from isolocal.config import RunConfig
from isolocal.core.device import resolve_amp, resolve_device
from isolocal.train import distributed
from isolocal.train.logs import HeadLogs
from isolocal.train.loop import MicroBatches, PretrainLoop, StageValues, build_model, micro_batch_size
from isolocal.train.optim import build_optimizers, build_scheduler
from isolocal.train.probes import Probes
from isolocal.train.step import backward_step, clip_stage_gradients, is_stagewise

BatchHook = Callable[[Tensor, Tensor], None]  # (images, mask) of every micro-batch, before its forward


class Trainer(PretrainLoop):
    """Everything one pre-training run needs; `fit()` runs it. `train()` below is the usual entry."""

    FIXED_ON_RESUME = (*PretrainLoop.FIXED_ON_RESUME, "train.per_stage_optimizers")

    def __init__(self, cfg: RunConfig, resume: bool = False, on_batch: BatchHook | None = None,
                 init: str | None = None):
        t = cfg.train
        self.cfg, self.on_batch = cfg, on_batch
        self.device = resolve_device(t.device)
        self.amp_dtype = resolve_amp(t.amp, self.device)
        self.dist = distributed.setup(self.device.type)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        try:
            self._build(resume, init)
        except BaseException:
            distributed.teardown(self.dist, barrier=False)
            raise

    def _build(self, resume: bool, init: str | None) -> None:
        cfg, t, world = self.cfg, self.cfg.train, self.dist.world
        micro_batch_size(t, t.accum_steps, world, ("train.accum_steps", "processes"))  # before any file is read
        self.resume_path = Path(cfg.out_dir) / LAST
        saved = self._open(resume, world)
        distributed.check_shared_dir(self.out_dir, self.dist)
        self._prepare_data(world, t.accum_steps, ("train.accum_steps", "processes"))

        self.model = build_model(cfg, init).to(self.device).train()
        if t.compile:
            self.model.compile_stages()
        if world > 1:
            distributed.broadcast_parameters(self.model)
        self.stage_params = [[p for p in s.parameters() if p.requires_grad] for s in self.model.stages]
        self.stagewise = is_stagewise(self.model)
        self.optimizers = build_optimizers(self.model, t)
        self.schedulers = [build_scheduler(opt, t, self.steps_per_epoch) for opt in self.optimizers]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.grad_norms = torch.zeros(self.model.num_stages, device=self.device)  # of the last step, before clipping
        self.head_logs = HeadLogs()  # of the last step
        self._start(saved, replica=self.dist.rank, loads_data=True, loss_device=self.device)
        wanted = t.analysis_every or t.knn_every_epochs
        self.probes = Probes(cfg, self.model) if wanted and self.dist.main else None

    @property
    def description(self) -> str:
        return f"pretrain ({self.mode})"

    # ------------------------------------------------------------------------------ the step

    def train_step(self, micro: MicroBatches) -> Tensor:
        """One optimizer step -> per-stage losses averaged over micro-batches; the per-stage gradient
        norms go to `grad_norms`. Both stay on the device: reading them is a host sync, done only
        when logging."""
        for sched in self.schedulers:
            sched.step_update(self.step)
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        self.head_logs.clear()
        losses = torch.zeros(self.model.num_stages, device=self.device)
        # Data parallel: a stage's all-reduce starts right after its backward of the last micro-batch
        # (isolated mode; global mode launches all of them after the one backward).
        averager = distributed.GradientAverager(self.stage_params, self.dist.world) if self.dist.world > 1 else None
        for i, (images, mask, *labels) in enumerate(micro):
            images = images.to(self.device, non_blocking=True)
            labels = labels[0].to(self.device, non_blocking=True) if labels else None
            if self.on_batch is not None:
                self.on_batch(images, mask)
            stage_done = averager.launch if averager is not None and i == len(micro) - 1 else None
            losses += backward_step(self.model, images, mask, self.scaler.scale, len(micro), self._autocast,
                                    stage_done, labels, self.head_logs)
        if averager is not None:
            averager.finish()
        for opt in self.optimizers:
            self.scaler.unscale_(opt)
        self.grad_norms = clip_stage_gradients(self.stage_params, self.cfg.train.clip_grad)
        if self.skip_nonfinite(losses, self.step_grad_norms()):
            self.scaler.update()
            return losses  # the update is dropped; the next step zeroes the gradients
        for opt in self.optimizers:
            self.scaler.step(opt)
        self.scaler.update()
        self.model.after_optimizer_step()
        return losses

    def _autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.bfloat16,
                              enabled=self.amp_dtype is not None)

    def stage_values(self, losses: Tensor) -> StageValues:
        """Losses averaged over ranks; norms are the same on every rank (gradients are averaged first)."""
        per_stage = {g["stage"]: g["lr"] for opt in self.optimizers for g in opt.param_groups}
        return StageValues(distributed.mean_over_ranks(losses, self.dist.world).tolist(), self.grad_norms.tolist(),
                           [per_stage[k] for k in sorted(per_stage)])

    def local_head_logs(self) -> dict[str, dict[int, float]]:
        return self.head_logs.read()

    def step_grad_norms(self) -> Tensor:
        """An fp16 GradScaler skips steps with inf gradients itself: then only losses are watched."""
        return torch.zeros_like(self.grad_norms) if self.scaler.is_enabled() else self.grad_norms

    def after_step(self, losses: Tensor) -> None:
        if self.probes is not None:
            self._log_probe(self.probes.after_step(self.step, self.model))

    def after_epoch(self) -> None:
        if self.probes is not None:
            self._log_probe(self.probes.after_epoch(self.epoch, self.model))

    def _log_probe(self, record: dict | None) -> None:
        if record is not None:
            self.log.write({**record, "time": self._elapsed()})

    # ------------------------------------------------------------------------------ checkpoints

    def write_checkpoint(self, state: dict) -> None:
        """Rank 0 writes one file: the loop's state, the model, optimizers, schedulers and scaler."""
        if not self.dist.main:
            return
        state.update(model=self.model.state_dict(), optimizer=[opt.state_dict() for opt in self.optimizers],
                     scheduler=[sched.state_dict() for sched in self.schedulers], scaler=self.scaler.state_dict())
        epoch_end = self.epoch if self.step_in_epoch == 0 else None
        save_checkpoint(state, self.out_dir, epoch_end, self.cfg.train.keep_last)

    def load_runner_state(self, saved: dict) -> None:
        check_fits(self.model, saved["model"], self.resume_path)
        self.model.load_state_dict(saved["model"])
        for opt, s in zip(self.optimizers, saved["optimizer"]):
            opt.load_state_dict(s)
        for sched, s in zip(self.schedulers, saved["scheduler"]):
            sched.load_state_dict(s)
        self.scaler.load_state_dict(saved["scaler"])


def train(cfg: RunConfig, resume: bool = False, on_batch: BatchHook | None = None, init: str | None = None) -> dict:
    """Pre-train `cfg` (resuming from `<out_dir>/last.pt` when asked, or starting from the weights of
    checkpoint `init`) and return a summary dict."""
    trainer = Trainer(cfg, resume, on_batch, init)
    try:
        return trainer.fit()
    finally:
        trainer.close()
