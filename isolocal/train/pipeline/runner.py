"""Pipeline pre-training: `pretrain_pipeline(cfg)` runs in every process of a torchrun/deepspeed launch.

World = pipeline ranks x data-parallel replicas (DeepSpeed's `PipeDataParallelTopology`). In each
replica, the first pipeline rank reads the loop's micro-batches (the trainer's, for
`pipeline.micro_batches` = `train.accum_steps`); the last rank only needs dummy labels for
DeepSpeed's loss call; each rank computes the targets of its own stages only.

The loop, its micro-batches, logs, checkpoint schedule and resume checks are the trainer's
(`isolocal.train.loop`); this module supplies the pipeline's step (`engine.train_batch`), its per-stage
values (every stage's loss, gradient norm and lr gathered from the ranks that own them) and its
checkpoints: DeepSpeed's (`<out_dir>/pipeline/<tag>/`, see `isolocal.io.checkpoint`), the loop's state
as their client state. After training, an `eval` record holds the loss on fixed held-out
micro-batches (`eval_batches`), which a converted checkpoint must reproduce.

Throughput (docs/pipeline.md, "Scaling"): ranks agree on stopping and saving one step late, so the
only pipeline-wide waits are log steps and saves (`_agree`); `pipeline.partition = "cost"` assigns
stages by a short timing pass on the first rank (kept on resume); `pipeline.profile = true` times
every rank's work by category and writes the breakdown and a Chrome trace to the run directory.

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

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.runtime.pipe.topology import PipeDataParallelTopology
from deepspeed.utils import logger
from torch import Tensor

from isolocal.io.checkpoint import PIPELINE_DIR, prune_pipeline_tags
from isolocal.config import ConfigError, RunConfig
from isolocal.config.schedule import resolve_schedule
from isolocal.data import MultiView, build_dataset, build_loader
from isolocal.core.device import resolve_amp, resolve_device
from isolocal.errors import NonFiniteError, RunInterrupted
from isolocal.models.encoder import StagewiseEncoder
from isolocal.train.pipeline.costmodel import predict, sync_every_of
from isolocal.train.pipeline.engine import build_engine
from isolocal.train.pipeline.module import StagePipe
from isolocal.train.pipeline.partition import cost_parts, describe
from isolocal.train.pipeline.timing import (RankTimes, breakdown_table, measure_stage_costs, plot_timeline,
                                           write_trace)
from isolocal.train.distributed import DistInfo, check_shared_dir, gather_objects, shutdown
from isolocal.train.launch import SPLIT, check_launch
from isolocal.train.loop import (EVAL_STREAM, MicroBatches, PretrainLoop, StageValues, build_model, derive_seed,
                                 model_inputs)
from isolocal.train.optim import build_scheduler, scaled_lr, stage_param_groups

PROFILE_FROM_STEP = 2  # `pipeline.profile` counts from this step on (the first ones warm up)


def init_distributed(device: torch.device, timeout_s: int) -> None:
    """DeepSpeed's process group with a bounded timeout, without JIT-building the unused shm op."""
    deepspeed.ops.__compatible_ops__ = {"deepspeed_shm_comm": False}  # the only switch (private); saves ~20 s
    logger.setLevel("WARNING")
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    deepspeed.init_distributed("nccl" if device.type == "cuda" else "gloo",
                               timeout=timedelta(seconds=timeout_s), verbose=False)


def eval_batches(cfg: RunConfig, model: StagewiseEncoder, micro_batch: int, count: int) -> list[tuple[Tensor, Tensor]]:
    """`count` fixed held-out micro-batches (images, mask[, labels]): eval transform, masks from the seed;
    with a contrastive head two views of each image (equal: the eval transform does not augment)."""
    d, m = cfg.data, cfg.model
    dataset, _, _ = build_dataset(d.name, d.root or None, train=False, img_size=m.img_size, in_chans=m.in_chans,
                                  transform_train=False, synthetic_size=d.synthetic_size, seed=cfg.train.seed,
                                  pad=d.pad)
    if len(dataset) < micro_batch * count:
        raise ConfigError(f"the held-out set has {len(dataset)} images, fewer than one global batch "
                          f"({micro_batch * count}) for the pipeline's eval loss")
    gen = torch.Generator().manual_seed(derive_seed(cfg.train.seed, EVAL_STREAM))
    if model.views > 1:
        dataset = MultiView(dataset, model.views)
    loader = iter(build_loader(dataset, micro_batch, shuffle=False, seed=cfg.train.seed))
    inputs = [model_inputs(next(loader), model.needs) for _ in range(count)]
    return [(x, model.random_mask(len(x), generator=gen), *labels) for x, *labels in inputs]


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
        self._prepare_data(self.dp, p.micro_batches, SPLIT)

        init_distributed(self.device, p.timeout_s)
        self.dist = DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"]))
        check_shared_dir(self.out_dir, self.dist)

        self.model = build_model(cfg, init)  # every rank builds the same full model: the single-process init
        parts = saved.get("pipeline_parts") if saved is not None else None  # a resume keeps its partition
        if parts is None and p.partition == "cost":
            parts = self._cost_parts()
        self.pipe = StagePipe(self.model, PipeDataParallelTopology(num_pp=self.stages, num_dp=self.dp), parts=parts,
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
        self._agreement: tuple | None = None  # the last step's stop / save flags, being reduced (`_agree`)
        self.times = RankTimes(self.dist.rank) if p.profile else None
        if self.times is not None:
            self._profile(self.times)
        self._start(saved, replica, loads_data=self.first, loss_device=self.device)

    @property
    def description(self) -> str:
        return f"pipeline {self.stages}x{self.dp} ({self.mode}, {self.engine.schedule_name})"

    def fit(self) -> dict:
        """The loop, then the held-out eval loss; the summary adds `eval_loss`, `rank`, `checkpoint`
        (and with `pipeline.profile`, `profile`: the per-rank breakdown)."""
        summary = super().fit()
        if self._agreement is not None:
            self._agreement[1].wait()
        extra = {"profile": self._report_profile()} if self.times is not None else {}
        return {**summary, "eval_loss": self.evaluate(), "rank": self.dist.rank, "checkpoint": str(self.ckpt_root),
                **extra}

    # ------------------------------------------------------------------------------ partition and profile

    def _cost_parts(self) -> list[int]:
        """The "cost" partition: the first rank times every stage on one micro-batch (a short pass that
        leaves weights and RNG streams as they were) and every rank takes its choice, printed with the
        predicted balance."""
        m = self.cfg.pipeline.micro_batches
        chosen = [None, None]
        if self.dist.rank == 0:
            costs = measure_stage_costs(self.model.to(self.device), self.micro_batch)
            chosen = [cost_parts(costs, self.stages, m), costs]
        dist.broadcast_object_list(chosen, src=0)
        parts, costs = chosen
        if self.dist.main:
            schedule = resolve_schedule(self.cfg.pipeline.schedule, self.model.isolated)
            guess = predict(costs, parts, m, schedule, sync_every=sync_every_of(schedule, self.cfg.train.log_every))
            print(f"isolocal pipeline: partition by measured cost: {describe(parts, costs, m)}; predicted "
                  f"{1e3 * guess.step_s:.0f} ms per step ({schedule}, bubble {guess.bubble:.0%})", file=sys.stderr)
        return parts

    def _profile(self, times: RankTimes) -> None:
        """Time the engine's instructions, the targets, and the runner's data loading and collectives."""
        self.engine.profile(times)
        self.pipe.times = times
        for name in ("_poll", "_log", "check_finite"):
            setattr(self, name, times.timed("sync", getattr(self, name)))

    def epoch_micro_batches(self) -> Iterator[MicroBatches | None]:
        """The loop's micro-batches; with `pipeline.profile`, the time to load them counts as "data"."""
        source = super().epoch_micro_batches()
        if self.times is None or not self.loads_data:
            yield from source
            return
        while True:
            with self.times.span("data"):
                micro = next(source, StopIteration)
            if micro is StopIteration:
                return
            yield micro

    def _report_profile(self) -> list[dict]:
        """Every rank's breakdown (ms per step); the main rank prints it and writes
        `<out_dir>/pipeline_profile.json`, the Chrome trace `<out_dir>/pipeline_trace.json` and its
        figure `<out_dir>/pipeline_timeline.png`."""
        ranks = gather_objects((self.times.summary(), self.times.events), self.dist.world)
        summaries = [s for s, _ in ranks]
        if self.dist.main:
            table = breakdown_table(summaries)
            print(f"isolocal pipeline: per-rank time, ms per step over {table.steps.iloc[0]} whole steps "
                  f"(from step {PROFILE_FROM_STEP}):\n{table.to_string(float_format=lambda v: f'{v:.1f}')}",
                  file=sys.stderr)
            (self.out_dir / "pipeline_profile.json").write_text(table.reset_index().to_json(orient="records", indent=2))
            events = [e for _, rank_events in ranks for e in rank_events]
            write_trace(self.out_dir / "pipeline_trace.json", events)
            if events:
                plot_timeline(self.out_dir / "pipeline_timeline.png", events)
        return summaries

    # ------------------------------------------------------------------------------ the step

    def train_step(self, micro: MicroBatches | None) -> Tensor:
        """One `train_batch` -> this rank's per-stage loss sums over its micro-batches (zero for the
        stages of other ranks)."""
        self.scheduler.step_update(self.step)
        if self.times is not None and self.step >= PROFILE_FROM_STEP:
            self.times.mark()
        self.pipe.head_logs.clear()
        self.engine.train_batch(self._feed(micro))
        return self.pipe.pop_loss_sums()

    def _agree(self, stop: bool, due_time: bool) -> tuple[bool, bool]:
        """The loop's stop / save-due flags, agreed one step late without waiting: each step launches the
        reduction of its own flags and reads the previous step's, which every rank reads at the same
        step. A blocking reduction per step would make the first rank wait for the last one's final
        micro-batch, a pipeline drain per step that the isolated schedule does not otherwise need."""
        flags = torch.tensor([stop, due_time], dtype=torch.float32, device=self.device)
        previous = self._agreement
        self._agreement = (flags, dist.all_reduce(flags, op=dist.ReduceOp.MAX, async_op=True), self.step)
        if previous is None:
            return False, False
        previous[1].wait()
        stop, due_time = (bool(v) for v in previous[0].tolist())
        return stop, due_time and previous[2] > self.saved_step  # not already saved since

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

    def local_head_logs(self) -> dict[str, dict[int, float]]:
        return self.pipe.head_logs.read()

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
        state = {**state, "pipeline_parts": [int(b) for b in self.pipe.parts]}  # a resume keeps the partition
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
    with exit_on_failure():
        run = PipelineRun(cfg, resume, init)
        summary = run.fit()
        run.close()
        shutdown()
    return summary
