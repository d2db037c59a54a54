"""The pre-training loop: global or stage-wise isolated back-propagation, one process or data parallel.

Read `Trainer.fit` top to bottom. Each optimizer step draws `accum_steps` micro-batches; for each,
masks come from the trainer's own generator, then:
- global mode (some boundary lets gradient through): one forward of the whole model and one
  backward of the summed loss;
- isolated mode (`model.isolated`): stage by stage, forward, backward of that stage's loss, then the
  detached output feeds the next stage. Each stage's graph is freed by its backward before the next
  stage runs, so peak activation memory is about one stage's.
Both modes draw the same images and masks in the same order, so their runs are comparable step by
step. Under torchrun (WORLD_SIZE > 1) gradients are averaged across ranks before the optimizer step
(see `distributed.py`); rank 0 writes logs and checkpoints.

Resume is exact, also mid-epoch: the lr is a function of the step, the loader of an epoch is a
function of (seed, epoch, rank), and the mask generator and torch RNG states are checkpointed. A
resumed epoch re-reads (without training on) the micro-batches it had already used, so that the
augmentation RNG stream is where it was.
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler, Subset
from tqdm import tqdm

from isolocal.config import ConfigError, RunConfig, TrainConfig, to_dict
from isolocal.data import build_dataset, build_loader
from isolocal.models.mim import LocalMIM
from isolocal.train import distributed
from isolocal.train.checkpoint import LAST, load_state, save_checkpoint
from isolocal.train.metrics import MetricsLog, PeakMemory, write_config
from isolocal.train.optim import build_optimizers, build_scheduler
from isolocal.train.probes import Probes
from isolocal.train.step import backward_step, compile_stages, is_stagewise

BatchHook = Callable[[Tensor, Tensor], None]  # (images, mask) of every micro-batch, before its forward


def derive_seed(*keys: int) -> int:
    """A well-mixed seed from integer keys, so mask and data streams of ranks and epochs never collide."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0] >> 1)


_MASK_STREAM, _DATA_STREAM = 0, 1
_FIXED_ON_RESUME = ("batch_size", "accum_steps", "seed")  # they define which batches and masks step n sees


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device = 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device(name)


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype: bf16 on CUDA for "auto"; full precision on CPU unless asked for."""
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


def build_train_dataset(cfg: RunConfig) -> Dataset:
    """The pre-training set (missing files fail here, before any training), cut to `data.train_subset`."""
    d, m = cfg.data, cfg.model
    dataset, _, _ = build_dataset(d.name, d.root or None, train=True, img_size=m.img_size, in_chans=m.in_chans,
                                  transform_train=True, synthetic_size=d.synthetic_size, seed=cfg.train.seed,
                                  crop_scale_min=d.crop_scale_min)
    if d.train_subset:
        if d.train_subset > len(dataset):
            raise ConfigError(f"data.train_subset ({d.train_subset}) exceeds the {len(dataset)} training images")
        dataset = Subset(dataset, range(d.train_subset))
    return dataset


def step_counts(t: TrainConfig, images: int, replicas: int, micro_batch: int, micro_per_step: int) -> tuple[int, int]:
    """(optimizer steps per epoch, steps of the whole run) for `images` split over `replicas`."""
    per_epoch = images // replicas // micro_batch // micro_per_step
    if per_epoch == 0:
        raise ConfigError(f"{images} training images over {replicas} replica(s) give no full step "
                          f"of train.batch_size {t.batch_size}; lower the batch or use more data")
    total = t.epochs * per_epoch
    return per_epoch, min(total, t.max_steps) if t.max_steps else total


class Trainer:
    """Everything one pre-training run needs; `fit()` runs it. `train()` below is the usual entry."""

    def __init__(self, cfg: RunConfig, resume: bool = False, on_batch: BatchHook | None = None):
        t = cfg.train
        self.cfg, self.on_batch = cfg, on_batch
        self.device = resolve_device(t.device)
        self.amp_dtype = resolve_amp(t.amp, self.device)
        self.dist = distributed.setup(self.device.type)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        try:
            self._build(resume)
        except BaseException:
            distributed.teardown(self.dist, barrier=False)
            raise

    def _build(self, resume: bool) -> None:
        cfg, t, world = self.cfg, self.cfg.train, self.dist.world
        if t.batch_size % (t.accum_steps * world):
            raise ConfigError(f"train.batch_size ({t.batch_size}) must be divisible by train.accum_steps "
                              f"({t.accum_steps}) x processes ({world})")
        self.micro_batch = t.batch_size // (t.accum_steps * world)
        self.out_dir = Path(cfg.out_dir)
        if not resume and (self.out_dir / LAST).exists():
            raise ValueError(f"{self.out_dir} already holds a run ({LAST}); pass --resume to continue it "
                             f"or choose another out_dir")

        self.dataset = build_train_dataset(cfg)
        self.steps_per_epoch, self.total_steps = step_counts(t, len(self.dataset), world, self.micro_batch,
                                                             t.accum_steps)

        torch.manual_seed(t.seed)  # same initial weights on every rank and in every mode
        self.model = LocalMIM(cfg.model).to(self.device).train()
        if t.compile:
            compile_stages(self.model)
        if world > 1:
            distributed.broadcast_parameters(self.model)
        self.stage_params = [[p for p in s.parameters() if p.requires_grad] for s in self.model.stages]
        self.stagewise = is_stagewise(self.model)
        self.optimizers = build_optimizers(self.model, t)
        self.schedulers = [build_scheduler(opt, t, self.steps_per_epoch) for opt in self.optimizers]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.mask_gen = torch.Generator().manual_seed(derive_seed(t.seed, _MASK_STREAM, self.dist.rank))
        self.step = self.epoch = self.step_in_epoch = 0
        self.epoch_loss_sum = torch.zeros(self.model.num_stages, device=self.device)  # this epoch so far
        self.elapsed_before = 0.0
        self.saved_step = -1
        if resume:
            self._restore(load_state(self.out_dir / LAST))

        self.log = MetricsLog(self.out_dir, enabled=self.dist.main)
        if self.dist.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            write_config(cfg, self.out_dir)
            self.log.start(self.step if resume else None)
        self.memory = PeakMemory(self.device)
        wanted = t.analysis_every or t.knn_every_epochs
        self.probes = Probes(cfg, self.model) if wanted and self.dist.main else None

    # ------------------------------------------------------------------------------ the loop

    def fit(self) -> dict:
        t = self.cfg.train
        mode = "isolated" if self.stagewise else "global"
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not self.dist.main,
                   desc=f"pretrain ({mode})", unit="step", dynamic_ncols=True)
        self.memory.reset()
        self.start = time.perf_counter()
        last_log, logged_steps = time.perf_counter(), 0
        losses = torch.zeros(self.model.num_stages, device=self.device)
        while self.epoch < t.epochs and not self._done():
            epoch_start, epoch_first_step = time.perf_counter(), self.step
            for micro in self._epoch_batches():
                losses, norms = self.train_step(micro)
                if self.probes is not None:
                    self._log_probe(self.probes.after_step(self.step, self.model))
                self.epoch_loss_sum += losses
                logged_steps += 1
                if self.step % t.log_every == 0:
                    now = time.perf_counter()
                    rec = self._record("step", self.step, losses, now - last_log, logged_steps)
                    rec["grad_norm_stage"] = norms.tolist()
                    self.log.write(rec)
                    bar.set_postfix(loss=f"{rec['loss']:.4f}")
                    last_log, logged_steps = now, 0
                self.step += 1
                self.step_in_epoch += 1
                bar.update()
                if self._done():
                    break
            if self.step_in_epoch == self.steps_per_epoch:  # a whole epoch (not a max_steps stop)
                self._end_epoch(time.perf_counter() - epoch_start, self.step - epoch_first_step)
        if self.saved_step != self.step and self.step > 0:
            self.save()
        bar.close()
        final = distributed.mean_over_ranks(losses, self.dist.world).tolist()
        return {"steps": self.step, "epochs_completed": self.epoch, "final_loss": sum(final),
                "final_loss_stage": final, "peak_mem_mb": self.memory.peak_mb(),
                "time": self._elapsed(), "out_dir": str(self.out_dir), "mode": mode}

    def _end_epoch(self, seconds: float, steps_here: int) -> None:
        """Log the epoch's mean losses (over all its steps, also across a resume), checkpoint it.
        Its time and speed cover the steps this process ran (all of them unless it resumed)."""
        t = self.cfg.train
        rec = self._record("epoch", self.step - 1, self.epoch_loss_sum / self.steps_per_epoch, seconds, steps_here)
        rec["epoch_time"] = seconds
        self.log.write(rec)
        self.epoch, self.step_in_epoch = self.epoch + 1, 0
        self.epoch_loss_sum.zero_()
        if self.probes is not None:
            self._log_probe(self.probes.after_epoch(self.epoch, self.model))
        if self.epoch % t.ckpt_every_epochs == 0 or self.epoch == t.epochs:
            self.save()

    def _log_probe(self, record: dict | None) -> None:
        if record is not None:
            self.log.write({**record, "time": self._elapsed()})

    def _done(self) -> bool:
        return bool(self.cfg.train.max_steps) and self.step >= self.cfg.train.max_steps

    def _epoch_batches(self) -> Iterator[list[Tensor]]:
        """Micro-batch groups of the current epoch, skipping the steps a resumed run already did."""
        t, rank, world = self.cfg.train, self.dist.rank, self.dist.world
        sampler = None
        if world > 1:
            sampler = DistributedSampler(self.dataset, world, rank, shuffle=True, seed=t.seed, drop_last=True)
            sampler.set_epoch(self.epoch)
        loader = build_loader(self.dataset, self.micro_batch, shuffle=sampler is None,
                              seed=derive_seed(t.seed, _DATA_STREAM, self.epoch, rank),
                              num_workers=self.cfg.data.num_workers, drop_last=True, sampler=sampler)
        images = (batch[0] for batch in loader)
        first = self.step_in_epoch
        for step in range(self.steps_per_epoch):
            group = [next(images) for _ in range(t.accum_steps)]
            if step >= first:
                yield group

    def train_step(self, micro_batches: list[Tensor]) -> tuple[Tensor, Tensor]:
        """One optimizer step -> (per-stage losses averaged over micro-batches, per-stage grad norms),
        both left on the device: reading them is a host sync, done only when logging."""
        for sched in self.schedulers:
            sched.step_update(self.step)
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        losses = torch.zeros(self.model.num_stages, device=self.device)
        for images in micro_batches:
            images = images.to(self.device, non_blocking=True)
            mask = self.model.random_mask(images.shape[0], generator=self.mask_gen)
            if self.on_batch is not None:
                self.on_batch(images, mask)
            losses += backward_step(self.model, images, mask, self.scaler.scale, len(micro_batches), self._autocast)
        if self.dist.world > 1:
            distributed.average_gradients(self.stage_params, self.dist.world)
        for opt in self.optimizers:
            self.scaler.unscale_(opt)
        norms = torch.stack([self._clip(params) for params in self.stage_params])
        for opt in self.optimizers:
            self.scaler.step(opt)
        self.scaler.update()
        return losses, norms

    def _autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.bfloat16,
                              enabled=self.amp_dtype is not None)

    def _clip(self, params: list[torch.nn.Parameter]) -> Tensor:
        """One stage's gradient norm, clipped to `clip_grad` when set (stages never share a norm)."""
        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
        if self.cfg.train.clip_grad > 0:
            torch.nn.utils.clip_grads_with_norm_(params, self.cfg.train.clip_grad, norm)
        return norm

    # ------------------------------------------------------------------------------ logs

    def _elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.start

    def _lrs(self) -> tuple[float, list[float]]:
        """(the schedule's lr, each stage's lr after its `stage_lr_scale`)."""
        groups = [g for opt in self.optimizers for g in opt.param_groups]
        per_stage = {g["stage"]: g["lr"] for g in groups}
        return groups[0]["lr"] / groups[0]["lr_scale"], [per_stage[k] for k in sorted(per_stage)]

    def _record(self, kind: str, step: int, losses: Tensor, seconds: float, steps: int) -> dict:
        """A log record; every rank calls it (the losses are averaged over ranks). `step` is the
        0-based index of the last optimizer step it covers, which is how a resume trims the log."""
        stage = distributed.mean_over_ranks(losses, self.dist.world).tolist()
        lr, lr_stage = self._lrs()
        return {"kind": kind, "step": step, "epoch": self.epoch, "loss": math.fsum(stage),
                "loss_stage": stage, "lr": lr, "lr_stage": lr_stage,
                "img_per_s": steps * self.cfg.train.batch_size / max(seconds, 1e-9),
                "peak_mem_mb": self.memory.peak_mb(), "time": self._elapsed()}

    # ------------------------------------------------------------------------------ checkpoints

    def save(self) -> Path | None:
        """Checkpoint the whole run state (rank 0 writes; every rank contributes its RNG states)."""
        rng = distributed.gather_objects(self._rng_state(), self.dist.world)
        self.saved_step = self.step
        if not self.dist.main:
            return None
        state = {
            "model": self.model.state_dict(),
            "config": to_dict(self.cfg),
            "optimizer": [opt.state_dict() for opt in self.optimizers],
            "scheduler": [sched.state_dict() for sched in self.schedulers],
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "epoch_loss_sum": self.epoch_loss_sum,
            "elapsed": self._elapsed(),
            "world_size": self.dist.world,
            "mask_generator": [r["mask_generator"] for r in rng],
            "rng": [{"torch": r["torch"], "cuda": r["cuda"]} for r in rng],
        }
        epoch_end = self.epoch if self.step_in_epoch == 0 else None
        return save_checkpoint(state, self.out_dir, epoch_end, self.cfg.train.keep_last)

    def _rng_state(self) -> dict:
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return {"mask_generator": self.mask_gen.get_state(), "torch": torch.get_rng_state(), "cuda": cuda}

    def _restore(self, state: dict) -> None:
        saved, now = state["config"], to_dict(self.cfg)
        diff = [f"model.{k}" for k in now["model"] if saved["model"].get(k) != now["model"][k]]
        diff += [f"train.{k}" for k in _FIXED_ON_RESUME if saved["train"][k] != now["train"][k]]
        if diff:
            raise ValueError(f"cannot resume: the config differs from the checkpoint's in {', '.join(diff)}")
        if state["world_size"] != self.dist.world:
            raise ValueError(f"cannot resume exactly: the checkpoint was written by {state['world_size']} "
                             f"process(es), this run has {self.dist.world}")
        if len(state["optimizer"]) != len(self.optimizers):
            raise ValueError("cannot resume: train.per_stage_optimizers differs from the checkpointed run")
        self.model.load_state_dict(state["model"])
        for opt, s in zip(self.optimizers, state["optimizer"]):
            opt.load_state_dict(s)
        for sched, s in zip(self.schedulers, state["scheduler"]):
            sched.load_state_dict(s)
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.step_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
        self.epoch_loss_sum = state["epoch_loss_sum"].to(self.device)
        self.elapsed_before = state["elapsed"]
        self.saved_step = self.step
        rank = self.dist.rank
        self.mask_gen.set_state(state["mask_generator"][rank])
        torch.set_rng_state(state["rng"][rank]["torch"])
        if self.device.type == "cuda" and state["rng"][rank]["cuda"] is not None:
            torch.cuda.set_rng_state(state["rng"][rank]["cuda"], self.device)

    def close(self) -> None:
        distributed.teardown(self.dist)


def train(cfg: RunConfig, resume: bool = False, on_batch: BatchHook | None = None) -> dict:
    """Pre-train `cfg` (resuming from `<out_dir>/last.pt` when asked) and return a summary dict."""
    trainer = Trainer(cfg, resume, on_batch)
    try:
        return trainer.fit()
    finally:
        trainer.close()
