"""The pre-training loop both runners share: position, micro-batches, logs, checkpoints and resume.

Read `PretrainLoop.fit` top to bottom. The loop owns the run's position (step, epoch, step within
the epoch, elapsed time), draws each optimizer step's micro-batches, writes the log records and
decides when to save. A runner supplies only its step and its state:
- `isolocal.train.trainer.Trainer`: one process or data parallel (torchrun), global or stage-wise
  isolated back-propagation;
- `isolocal.train.pipeline.runner.PipelineRun`: a DeepSpeed pipeline over the model's stages.

Micro-batches (`epoch_micro_batches`): one loader per epoch, seeded by (seed, epoch, replica), a
`DistributedSampler` splitting the data over replicas, `micro_per_step` micro-batches per optimizer
step, and masks from the run's own generator, seeded by (seed, replica). So a pipeline with
`pipeline.micro_batches` = the trainer's `train.accum_steps` sees the trainer's images and masks, by
construction; pipeline ranks other than the first read no data.

Resume is exact, also mid-epoch: the lr is a function of the step, the loader of an epoch a
function of (seed, epoch, replica), and every rank's mask generator, RNG states and epoch loss sums
are checkpointed. A resumed epoch re-reads (without training on) the micro-batches it had already
used, so that the augmentation RNG stream is where it was. What decides which images and masks
step n sees (the model, `FIXED_ON_RESUME`, the number of processes) is fixed on resume: a change is
refused with one line, before any work.

Where code that must see every step or every save of both runners hooks in: `after_step` (each
optimizer step, with its losses still on the device) and `save` (the one save point).

When things go wrong (both runners get all of this from here):
- Non-finite values, `train.nonfinite = "stop"`: after every step the loop folds "is any stage's loss
  or gradient norm NaN/inf" into a device-side record of the first bad step per stage (a few tiny
  device ops, no host read, so the hot path stays free of syncs). The record is read at every log
  step and before every save: the run stops there with one line naming the first bad step, the stage
  and loss or gradient, and no checkpoint is written after it, so the last good one stays. The price
  of reading it only there: up to `train.log_every` - 1 steps run on after the bad one (their weights
  are never saved). `"skip"` reads the flag every step (one host read per step, on the trainer only):
  that step's update is dropped, counted in the log (`skipped_steps`), and `train.nonfinite_max_skips`
  consecutive skips stop the run.
- SIGINT / SIGTERM / SIGUSR1 (Slurm's warning before a time limit): the handler only sets a flag; the current step finishes, `save` writes the
  checkpoint atomically, and `RunInterrupted` (exit 130) says how to resume. A second Ctrl-C stops at
  once, unsaved, except under torchrun's agent, which forwards the terminal's Ctrl-C a second time. Several processes agree
  on the step to stop at (and on time-based saves) with one two-value all-reduce per step, which is a
  host read per step; a single process needs none.
- Mid-epoch checkpoints: `train.ckpt_every_steps` and `train.ckpt_every_minutes` save `last.pt`
  mid-epoch; resume from them is exact like any mid-epoch resume.
- `--resume` with an unreadable newest checkpoint falls back to the newest intact `epoch_NNNN.pt`
  and says so; temp files of a save that was killed are removed at start.
"""
from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler, Subset
from tqdm import tqdm

from isolocal.core.progress import progress_bar
from isolocal.io.checkpoint import (LAST, PIPELINE_DIR, epoch_checkpoints, init_state, load_state,
                                 remove_stale_temps, run_state)
from isolocal.config import ConfigError, ModelConfig, RunConfig, TrainConfig, from_dict, to_dict
from isolocal.config.head_options import option_key, resolve_options
from isolocal.data import MultiView, build_dataset, build_loader, check_labels, views_first
from isolocal.errors import CheckpointError, NonFiniteError, RunInterrupted
from isolocal.heads import StagePlan
from isolocal.io.load import seeded_init
from isolocal.io.paths import check_writable_dir
from isolocal.models.encoder import StagewiseEncoder
from isolocal.train import distributed
from isolocal.train.distributed import DistInfo
from isolocal.train.logs import MetricsLog, PeakMemory, check_tensorboard, head_log_fields, write_config
from isolocal.train.step import is_stagewise

MASK_STREAM, DATA_STREAM, EVAL_STREAM = 0, 1, 2  # the keys of a run's independent random streams
# One optimizer step's micro-batches: (images, mask), plus labels when a head needs them. Images of
# a model with a contrastive head hold both views, stacked along the batch as [view 1; view 2].
MicroBatches = list[tuple[Tensor, ...]]


def derive_seed(*keys: int) -> int:
    """A well-mixed seed from integer keys, so mask and data streams of ranks and epochs never collide."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0] >> 1)


def build_train_dataset(cfg: RunConfig) -> Dataset:
    """The pre-training set (missing files fail here, before any training), cut to `data.train_subset`;
    labels checked when a head needs them, two views per image when a head contrasts them."""
    d, m = cfg.data, cfg.model
    plan = StagePlan.from_config(m)
    dataset, _, _ = build_dataset(d.name, d.root or None, train=True, img_size=m.img_size, in_chans=m.in_chans,
                                  transform_train=True, synthetic_size=d.synthetic_size, seed=cfg.train.seed,
                                  crop_scale_min=d.crop_scale_min, pad=d.pad)
    base = dataset
    if d.train_subset:
        if d.train_subset > len(dataset):
            raise ConfigError(f"data.train_subset ({d.train_subset}) exceeds the {len(dataset)} training images")
        dataset = Subset(dataset, range(d.train_subset))
    if "labels" in plan.needs:
        check_labels(base, d.name, f"model.objective {' / '.join(plan.heads_needing('labels'))}", class_counts(plan, m))
    return MultiView(dataset, plan.views) if plan.views > 1 else dataset


def class_counts(plan: StagePlan, m: ModelConfig) -> dict[str, int]:
    """The class count of every head that needs labels and has a `num_classes` option, by its config key;
    a head wrapping another (`man`: the option `head`) counts that one's."""
    trained = [(name, options) for name, head, options in zip(plan.objectives, plan.heads, plan.options)
               if "labels" in head.needs]
    trained += [(options.head, resolve_options(m, options.head)) for _, options in trained if hasattr(options, "head")]
    return {option_key(m, name, "num_classes"): options.num_classes for name, options in trained
            if hasattr(options, "num_classes")}


def model_inputs(batch: list[Tensor], needs: frozenset[str]) -> tuple[Tensor, ...]:
    """A loader batch -> (images, labels if a head `needs` them); stacked views as [view 1; view 2]."""
    images, labels = batch
    images = views_first(images) if images.dim() == 5 else images
    return (images, labels) if "labels" in needs else (images,)


def micro_batch_size(t: TrainConfig, micro_per_step: int, replicas: int, names: tuple[str, str]) -> int:
    """Images per micro-batch: `train.batch_size` split into `micro_per_step` micro-batches on each of
    `replicas`; `names` say what those two numbers are called in the error when they do not divide it."""
    if t.batch_size % (micro_per_step * replicas):
        raise ConfigError(f"train.batch_size ({t.batch_size}) must be divisible by {names[0]} ({micro_per_step}) "
                          f"x {names[1]} ({replicas})")
    return t.batch_size // (micro_per_step * replicas)


def step_counts(t: TrainConfig, images: int, replicas: int, micro_batch: int, micro_per_step: int) -> tuple[int, int]:
    """(optimizer steps per epoch, steps of the whole run) for `images` split over `replicas`."""
    per_epoch = images // replicas // micro_batch // micro_per_step
    if per_epoch == 0:
        raise ConfigError(f"{images} training images over {replicas} replica(s) give no full step "
                          f"of train.batch_size {t.batch_size}; lower the batch or use more data")
    total = t.epochs * per_epoch
    return per_epoch, min(total, t.max_steps) if t.max_steps else total


def build_model(cfg: RunConfig, init: str | None = None) -> StagewiseEncoder:
    """The run's model at its seeded init (the same weights in every process and mode), or with `init`
    the weights of that checkpoint (any isolocal checkpoint or run directory)."""
    model = seeded_init(cfg)
    if init is not None:
        model.load_state_dict(init_state(init, model))
    model.grad_checkpoint = cfg.train.grad_checkpoint
    return model


def _setting(cfg: dict, key: str) -> Any:
    section, name = key.split(".")
    return cfg.get(section, {}).get(name)


def check_resume(saved: dict, cfg: RunConfig, world: int, fixed: Sequence[str]) -> None:
    """Refuse (one line) to resume a run whose model, `fixed` settings or process count differ from
    the checkpoint's: they decide which images and masks step n sees."""
    if "ranks" not in saved:
        raise ValueError("cannot resume: the checkpoint predates the per-rank run state of the shared loop "
                         "(RNG states, epoch sums); start a new run from its weights with --init")
    before, now = saved["config"], to_dict(cfg)
    # Read as this version reads it: a field added since the checkpoint was written held its default there,
    # 0.2's flat head keys are head options. Head options compare as each stage resolves them.
    old = from_dict(ModelConfig, before["model"])
    before = {**before, "model": to_dict(old)}
    diff = [f"model.{k}" for k, value in before["model"].items() if k != "head_options" and value != now["model"][k]]
    if StagePlan.from_config(old, skip_missing=True).options != StagePlan.from_config(cfg.model).options:
        diff.append("model.head_options")
    diff += [key for key in fixed if _setting(before, key) != _setting(now, key)]
    if diff:
        was = ", ".join(repr(_setting(before, key)) for key in diff)
        got = ", ".join(repr(_setting(now, key)) for key in diff)
        raise ValueError(f"cannot resume: the config differs from the checkpoint's in {', '.join(diff)} "
                         f"(checkpoint: {was}; this run: {got})")
    if saved["world_size"] != world:
        raise ValueError(f"cannot resume exactly: the checkpoint was written by {saved['world_size']} "
                         f"process(es), this run has {world}")


@dataclass
class StageValues:
    """One log record's per-stage values, gathered from every rank that holds a stage."""

    loss: list[float]
    grad_norm: list[float]
    lr: list[float]


class PretrainLoop(ABC):
    """Position, micro-batches, logs, checkpoints and resume of a pre-training run; `fit()` runs it.

    A runner builds its model and optimizers between `_open` / `_prepare_data` and `_start`, and
    supplies `train_step`, `stage_values`, `write_checkpoint`, `load_runner_state`.
    """

    FIXED_ON_RESUME: tuple[str, ...] = ("train.batch_size", "train.accum_steps", "train.seed")

    cfg: RunConfig
    dist: DistInfo
    device: torch.device
    model: StagewiseEncoder
    optimizers: list[torch.optim.Optimizer]
    resume_path: Path  # what `--resume` reads: the trainer's last.pt, the pipeline's checkpoint directory

    # ------------------------------------------------------------------------------ building

    def _open(self, resume: bool, world: int) -> dict | None:
        """Refuse to overwrite a run; with `resume`, the saved run state, checked against this run.
        Also checks the model's geometry and removes temp files of a killed save, before any work."""
        self.out_dir = Path(self.cfg.out_dir)
        StagewiseEncoder.check_config(self.cfg.model)
        StagewiseEncoder.check_masking(self.cfg.model)
        if self.cfg.train.tensorboard:
            check_tensorboard()
        check_writable_dir(self.out_dir, "run directory (out_dir)")
        for tmp in remove_stale_temps(self.out_dir):
            print(f"isolocal: removed {tmp.name}, left by a save that was killed", file=sys.stderr)
        if not resume:
            held = [p for p in (self.out_dir / LAST, self.out_dir / PIPELINE_DIR / "latest") if p.exists()]
            if held:
                raise ValueError(f"{self.out_dir} already holds a run ({held[0].relative_to(self.out_dir)}); "
                                 "pass --resume to continue it or choose another out_dir")
            return None
        if not self.resume_path.exists():
            raise FileNotFoundError(f"no checkpoint at {self.resume_path} to resume")
        saved = self._read_resume_state()
        check_resume(saved, self.cfg, world, self.FIXED_ON_RESUME)
        return saved

    def _read_resume_state(self) -> dict:
        """The newest readable run state: `resume_path`, else (a single-file run) the newest intact
        `epoch_NNNN.pt`, with one line saying which; the unreadable file's error if none is intact."""
        try:
            return run_state(self.resume_path)
        except CheckpointError as err:
            if not self.resume_path.is_file():
                raise
            for path in reversed(epoch_checkpoints(self.out_dir)):
                try:
                    saved = load_state(path)
                except CheckpointError:
                    continue
                print(f"isolocal: {err}; resuming from {path.name} (step {saved['step']}) instead",
                      file=sys.stderr)
                return saved
            raise CheckpointError(f"{err}; no intact epoch_NNNN.pt beside it to resume from") from None

    def _prepare_data(self, replicas: int, micro_per_step: int, names: tuple[str, str]) -> None:
        """The micro-batch size (see `micro_batch_size`), the training set and the step counts it gives."""
        t = self.cfg.train
        micro_batch = micro_batch_size(t, micro_per_step, replicas, names)
        StagePlan.from_config(self.cfg.model).check_micro_batch(
            micro_batch, f"train.batch_size {t.batch_size} over {names[0]} {micro_per_step} x {names[1]} {replicas}")
        self.replicas, self.micro_batch, self.micro_per_step = replicas, micro_batch, micro_per_step
        self.dataset = build_train_dataset(self.cfg)
        self.steps_per_epoch, self.total_steps = step_counts(self.cfg.train, len(self.dataset), replicas,
                                                             micro_batch, micro_per_step)

    def _start(self, saved: dict | None, replica: int, loads_data: bool, loss_device: torch.device) -> None:
        """Mask stream and position (restored from `saved`: the runner's state first, then the
        loop's), then the run directory's config and logs."""
        t = self.cfg.train
        self.replica, self.loads_data = replica, loads_data
        self.mask_gen = torch.Generator().manual_seed(derive_seed(t.seed, MASK_STREAM, replica))
        self.step = self.epoch = self.step_in_epoch = 0
        self.epoch_loss_sum = torch.zeros(self.model.num_stages, device=loss_device)  # this epoch so far
        self.elapsed_before = 0.0
        self.saved_step = -1
        # Non-finite guard: first bad step per (loss, gradient) x stage, -1 = none; on the device.
        self.first_bad = torch.full((2, self.model.num_stages), -1, dtype=torch.long, device=loss_device)
        self.skipped_steps = self.consecutive_skips = 0
        self.last_loss_stage: list[float] | None = None  # of the last step, as saved (a finished run's)
        self._signal: str | None = None
        if saved is not None:
            self.load_runner_state(saved)
            self._restore(saved)
        self.log = MetricsLog(self.out_dir, enabled=self.dist.main, tensorboard=t.tensorboard)
        if self.dist.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            write_config(self.cfg, self.out_dir)
            self.log.start(self.step if saved is not None else None)
        self.memory = PeakMemory(self.device)

    @property
    def mode(self) -> str:
        return "isolated" if is_stagewise(self.model) else "global"

    # ------------------------------------------------------------------------------ the loop

    def fit(self) -> dict:
        """Train to the end (or until SIGINT/SIGTERM: `RunInterrupted` once the state is saved); the
        summary dict. A run that had already finished trains nothing and reports its saved final loss
        (`already_finished`)."""
        finished = self.step >= self.total_steps or self.epoch >= self.cfg.train.epochs
        bar = progress_bar(total=self.total_steps, initial=self.step, disable=not self.dist.main or finished,
                           desc=self.description, unit="step", dynamic_ncols=True)
        self.memory.reset()
        self.start = self.last_save_time = time.perf_counter()
        self.last_losses = torch.zeros_like(self.epoch_loss_sum)
        handlers = self._catch_signals()
        try:
            self._run(bar)
        finally:
            bar.close()  # before any error line, so the two never share a terminal line
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        final = self.last_loss_stage if finished and self.last_loss_stage else self.stage_values(self.last_losses).loss
        return {"steps": self.step, "epochs_completed": self.epoch, "final_loss": math.fsum(final),
                "final_loss_stage": final, "peak_mem_mb": self.memory.peak_mb(), "time": self._elapsed(),
                "out_dir": str(self.out_dir), "mode": self.mode, "already_finished": finished}

    def _run(self, bar: tqdm) -> None:
        t = self.cfg.train
        last_log = time.perf_counter()
        logged_steps = 0
        self.save_pending = False
        while self.epoch < t.epochs and self.step < self.total_steps:
            epoch_start, epoch_first_step = time.perf_counter(), self.step
            for micro in self.epoch_micro_batches():
                losses = self.last_losses = self.train_step(micro)
                self._track_nonfinite(losses)
                self.after_step(losses)
                self.epoch_loss_sum += losses
                logged_steps += 1
                if self.step % t.log_every == 0 or self.step + 1 == self.total_steps:  # and the run's last step
                    self.check_finite()
                    now = time.perf_counter()
                    rec = self._log("step", self.step, losses, now - last_log, logged_steps)
                    bar.set_postfix(loss=f"{rec['loss']:.4f}")
                    last_log, logged_steps = now, 0
                self.step += 1
                self.step_in_epoch += 1
                bar.update()
                stop, due = self._poll()
                if stop and self.step < self.total_steps:
                    self.save()
                    bar.close()
                    raise RunInterrupted(
                        f"interrupted by {self._signal or 'a signal on another rank'} after step {self.step} "
                        f"(epoch {self.epoch}); state saved to {self.resume_path}; continue with the same "
                        "command plus --resume")
                if due and self.step_in_epoch < self.steps_per_epoch and self.step < self.total_steps:
                    self.save()
                self.save_pending = due and self.saved_step != self.step
                if self.step >= self.total_steps:
                    break
            if self.step_in_epoch == self.steps_per_epoch:  # a whole epoch (not a max_steps stop)
                self._end_epoch(time.perf_counter() - epoch_start, self.step - epoch_first_step)
        if self.saved_step != self.step and self.step > 0:
            self.save()

    def _end_epoch(self, seconds: float, steps_here: int) -> None:
        """Log the epoch's mean losses (over all its steps, also across a resume), checkpoint it.
        Its time and speed cover the steps this process ran (all of them unless it resumed)."""
        t = self.cfg.train
        self._log("epoch", self.step - 1, self.epoch_loss_sum / self.steps_per_epoch, seconds, steps_here,
                  epoch_time=seconds)
        self.epoch, self.step_in_epoch = self.epoch + 1, 0
        self.epoch_loss_sum.zero_()
        self.after_epoch()
        if self.epoch % t.ckpt_every_epochs == 0 or self.epoch == t.epochs or self.save_pending:
            self.save()

    def epoch_micro_batches(self) -> Iterator[MicroBatches | None]:
        """Per remaining step of the current epoch, its micro-batches (images, mask); None on ranks
        that read no data (pipeline ranks after the first)."""
        first = self.step_in_epoch
        if not self.loads_data:
            for _ in range(first, self.steps_per_epoch):
                yield None
            return
        t = self.cfg.train
        sampler = None
        if self.replicas > 1:
            sampler = DistributedSampler(self.dataset, self.replicas, self.replica, shuffle=True, seed=t.seed,
                                         drop_last=True)
            sampler.set_epoch(self.epoch)
        loader = build_loader(self.dataset, self.micro_batch, shuffle=sampler is None,
                              seed=derive_seed(t.seed, DATA_STREAM, self.epoch, self.replica),
                              num_workers=self.cfg.data.num_workers, drop_last=True, sampler=sampler,
                              prefetch=self.cfg.data.prefetch and not self.cfg.data.num_workers)
        inputs = (model_inputs(batch, self.model.needs) for batch in loader)
        for step in range(self.steps_per_epoch):
            group = [next(inputs) for _ in range(self.micro_per_step)]
            if step >= first:
                yield [(x, self.model.random_mask(len(x), generator=self.mask_gen), *labels) for x, *labels in group]

    # ------------------------------------------------------------------------------ what a runner supplies

    @property
    @abstractmethod
    def description(self) -> str:
        """The progress bar's label."""

    @abstractmethod
    def train_step(self, micro: MicroBatches | None) -> Tensor:
        """One optimizer step on `micro` -> this rank's per-stage losses (summed or averaged, as
        `stage_values` expects them), left on their device."""

    @abstractmethod
    def stage_values(self, losses: Tensor) -> StageValues:
        """Every stage's loss (from `train_step`'s output, or a sum of them), gradient norm and lr;
        every rank calls it (it may reduce over ranks)."""

    @abstractmethod
    def local_head_logs(self) -> dict[str, dict[int, float]]:
        """This process's heads' logs of the last step, {key: {stage: mean over its micro-batches}}
        (`HeadLogs.read`, a host read)."""

    @abstractmethod
    def write_checkpoint(self, state: dict) -> None:
        """Save the runner's state together with the loop's `state`; every rank calls it."""

    @abstractmethod
    def load_runner_state(self, saved: dict) -> None:
        """Restore what `write_checkpoint` saved besides the loop's state."""

    @abstractmethod
    def step_grad_norms(self) -> Tensor:
        """The last step's per-stage gradient norms that the non-finite guard watches (zeros where a
        non-finite gradient is expected and handled, e.g. by an fp16 GradScaler)."""

    def after_step(self, losses: Tensor) -> None:
        """Called after every optimizer step, before it is counted or logged."""

    def after_epoch(self) -> None:
        """Called after every whole epoch, once it is counted and logged, before its checkpoint."""

    # ------------------------------------------------------------------------------ when things go wrong

    def _track_nonfinite(self, losses: Tensor) -> None:
        """Fold this step's non-finite losses / gradient norms into `first_bad`, on the device (no read)."""
        if self.cfg.train.nonfinite != "stop":
            return
        norms = self.step_grad_norms().to(losses.device)
        bad = torch.stack([~torch.isfinite(losses), ~torch.isfinite(norms)])
        self.first_bad = torch.where(bad & (self.first_bad < 0), self.step, self.first_bad)

    def check_finite(self) -> None:
        """Raise `NonFiniteError` naming the first bad step, stage and value if any step so far had one;
        every rank calls it (it gathers the ranks' records)."""
        records = distributed.gather_objects(self.first_bad.tolist(), self.dist.world)
        found = [(step, stage, what) for rec in records for what, row in zip(("loss", "gradient"), rec)
                 for stage, step in enumerate(row) if step >= 0]
        if not found:
            return
        step = min(found)[0]
        where = "; ".join(f"{what} of stage(s) {', '.join(str(k) for s, k, w in sorted(set(found)) if s == step and w == what)}"
                          for what in ("loss", "gradient") if (step, what) in {(s, w) for s, _, w in found})
        kept = f"the last good checkpoint (step {self.saved_step}) is kept" if self.saved_step >= 0 else \
            "no checkpoint was written"
        raise NonFiniteError(f"non-finite values at step {step} (0-based): {where}; training stopped and {kept}; "
                             "lower train.base_lr, set train.clip_grad, or train.nonfinite='skip'")

    def skip_nonfinite(self, losses: Tensor, grad_norms: Tensor) -> bool:
        """With `train.nonfinite = "skip"`: True when this step's losses or gradients are non-finite,
        so the runner drops its update (a host read per step); `nonfinite_max_skips` in a row stop the run."""
        if self.cfg.train.nonfinite != "skip":
            return False
        if bool(torch.isfinite(losses).all() and torch.isfinite(grad_norms).all()):
            self.consecutive_skips = 0
            return False
        self.skipped_steps += 1
        self.consecutive_skips += 1
        limit = self.cfg.train.nonfinite_max_skips
        if self.consecutive_skips >= limit:
            raise NonFiniteError(f"non-finite loss or gradient in {limit} consecutive steps (the last: step "
                                 f"{self.step}, 0-based): train.nonfinite_max_skips reached, training stopped; "
                                 f"the last good checkpoint (step {self.saved_step}) is kept")
        return True

    def _catch_signals(self) -> dict:
        """SIGINT, SIGTERM and SIGUSR1 (what Slurm sends before a time limit) only set a flag (the loop
        saves and stops after the step); the old handlers."""
        if threading.current_thread() is not threading.main_thread():
            return {}

        forwarded = "TORCHELASTIC_RUN_ID" in os.environ  # the agent repeats the terminal's Ctrl-C

        def flag(signum: int, frame: Any) -> None:
            if self._signal is not None and signum == signal.SIGINT and not forwarded:  # stop now, unsaved
                raise KeyboardInterrupt
            self._signal = signal.Signals(signum).name

        return {sig: signal.signal(sig, flag) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}

    def _poll(self) -> tuple[bool, bool]:
        """(stop for a signal, a step- or time-based checkpoint is due), the same on every rank."""
        t = self.cfg.train
        due_time = bool(t.ckpt_every_minutes) and time.perf_counter() - self.last_save_time >= 60 * t.ckpt_every_minutes
        stop = self._signal is not None
        if self.dist.world > 1:  # ranks agree (a signal or the clock may differ between them)
            stop, due_time = self._agree(stop, due_time)
        due_steps = bool(t.ckpt_every_steps) and self.step % t.ckpt_every_steps == 0
        return stop, due_steps or due_time

    def _agree(self, stop: bool, due_time: bool) -> tuple[bool, bool]:
        """Both flags, each the maximum over ranks (a blocking all-reduce)."""
        flags = torch.tensor([stop, due_time], dtype=torch.float32, device=self.device)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        stop, due_time = (bool(v) for v in flags.tolist())
        return stop, due_time

    # ------------------------------------------------------------------------------ logs

    def _elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.start

    def _log(self, kind: str, step: int, losses: Tensor, seconds: float, steps: int, **extra: float) -> dict:
        """Write a log record; every rank calls it. `step` is the 0-based index of the last optimizer
        step it covers, which is how a resume trims the log; `steps` optimizer steps took `seconds`."""
        values = self.stage_values(losses)
        group = self.optimizers[0].param_groups[0]
        rec = {"kind": kind, "step": step, "epoch": self.epoch, "loss": math.fsum(values.loss),
               "loss_stage": values.loss, "lr": group["lr"] / group["lr_scale"], "lr_stage": values.lr,
               "img_per_s": steps * self.cfg.train.batch_size / max(seconds, 1e-9) if steps else None,
               "peak_mem_mb": distributed.max_over_ranks(self.memory.peak_mb(), self.dist.world, self.device),
               "time": self._elapsed(), **extra}
        if kind == "step":
            rec["grad_norm_stage"] = values.grad_norm
            if not all(map(self.model.plan.reconstructs, range(self.model.num_stages))):  # `mim` logs nothing
                ranks = distributed.gather_objects(self.local_head_logs(), self.dist.world)
                rec.update(head_log_fields(ranks, self.model.num_stages))
        if self.cfg.train.nonfinite == "skip":
            rec["skipped_steps"] = self.skipped_steps
        self.log.write(rec)
        return rec

    # ------------------------------------------------------------------------------ checkpoints

    def save(self) -> None:
        """The one save point; every rank calls it and contributes its RNG states and epoch sums.
        Nothing is written after a non-finite step (`check_finite` raises first)."""
        self.check_finite()
        if self.step > self.saved_step:  # a step ran since the last save or restore
            self.last_loss_stage = self.stage_values(self.last_losses).loss
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        ranks = distributed.gather_objects({"mask_generator": self.mask_gen.get_state(), "torch": torch.get_rng_state(),
                                            "cuda": cuda, "epoch_loss_sum": self.epoch_loss_sum.cpu()},
                                           self.dist.world)
        self.write_checkpoint({"config": to_dict(self.cfg), "step": self.step, "epoch": self.epoch,
                               "step_in_epoch": self.step_in_epoch, "elapsed": self._elapsed(),
                               "world_size": self.dist.world, "ranks": ranks, "last_loss_stage": self.last_loss_stage,
                               "skipped_steps": self.skipped_steps})
        self.saved_step = self.step
        self.last_save_time = time.perf_counter()

    def _restore(self, saved: dict) -> None:
        self.step, self.epoch, self.step_in_epoch = saved["step"], saved["epoch"], saved["step_in_epoch"]
        self.elapsed_before = saved["elapsed"]
        self.saved_step = self.step
        self.last_loss_stage = saved.get("last_loss_stage")
        self.skipped_steps = saved.get("skipped_steps", 0)
        mine = saved["ranks"][self.dist.rank]
        self.epoch_loss_sum.copy_(mine["epoch_loss_sum"])
        self.mask_gen.set_state(mine["mask_generator"])
        torch.set_rng_state(mine["torch"])
        if self.device.type == "cuda" and mine["cuda"] is not None:
            torch.cuda.set_rng_state(mine["cuda"], self.device)

    def close(self) -> None:
        """Flush the logs; end the process group if this run created it."""
        self.log.close()
        distributed.teardown(self.dist)
