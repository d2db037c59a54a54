"""A pipeline plan for any preset (`isolocal info --pipeline-stages S`), static or measured.

The costs per stage come either from counted FLOPs at an assumed throughput (`counted_stage_costs`:
at once, even for ViT-L) or, with `repeats` > 0 (`info --measure`), from timing the stages once on
this device (`timing.measure_stage_costs`: minutes for a large model on a CPU). Then `costmodel`
predicts, for both partitions and every schedule (`isolocal.config.schedule.SCHEDULES`), the step
time, bubble and speed-up over one worker. The bubble, balance and speed-up carry over to devices
where every stage speeds up alike; counted costs leave out the optimizer step and the difference
between stages' arithmetic efficiency.
"""
from __future__ import annotations

import pandas as pd

from isolocal.config import RunConfig
from isolocal.config.schedule import SCHEDULES
from isolocal.core.device import resolve_device
from isolocal.models.encoder import StagewiseEncoder
from isolocal.models.stage_cost import stage_table
from isolocal.train.pipeline.costmodel import Link, StageCost, predict, sync_every_of
from isolocal.train.pipeline.module import balanced_parts  # DeepSpeed's partitioner, as the runner uses it
from isolocal.train.pipeline.partition import cost_parts
from isolocal.train.pipeline.timing import measure_stage_costs


def plan_table(model: StagewiseEncoder, costs: list[StageCost], ranks: int, micro_batches: int, micro_batch: int,
               link: Link = Link(), log_every: int = 1) -> pd.DataFrame:
    """One row per (partition, schedule): the ranks' stage ranges, balance bound, predicted step time,
    bubble, images/s and speed-up over one worker; syncs as in a run of `log_every` (`sync_every_of`)."""
    partitions = {"count": [int(b) for b in balanced_parts(model, ranks)],
                  "cost": cost_parts(costs, ranks, micro_batches)}
    rows = []
    for name, parts in partitions.items():
        for schedule in SCHEDULES:
            guess = predict(costs, parts, micro_batches, schedule, link, sync_every=sync_every_of(schedule, log_every))
            rows.append({"partition": name, "schedule": schedule,
                         "stages_per_rank": " | ".join(f"{a}-{b - 1}" for a, b in zip(parts, parts[1:])),
                         "bound": guess.bound, "step_ms": 1e3 * guess.step_s, "bubble": guess.bubble,
                         "img_s": micro_batch * micro_batches / guess.step_s, "speedup": guess.speedup})
    return pd.DataFrame(rows)


BACKWARD_PER_FORWARD = 2.0  # a backward costs about two forwards (gradients of inputs and of weights)


def counted_stage_costs(cfg: RunConfig, micro_batch: int, tflops: float) -> list[StageCost]:
    """Per stage, from the FLOPs of one image (`stage_table` without timing) at `tflops` TFLOP/s: forward
    of a micro-batch, a backward of `BACKWARD_PER_FORWARD` forwards, the bytes a rank ending there sends
    (its output, the images for later targets, the mask, the loss slots); the optimizer step is left out."""
    table = stage_table(cfg, repeats=0)
    m = cfg.model
    per_image = 4 * m.in_chans * m.img_size ** 2 + (m.img_size // m.patch_size) ** 2  # float images, bool mask
    costs = []
    for row in table.itertuples():
        forward = row.gflops * 1e9 * micro_batch / (tflops * 1e12)
        costs.append(StageCost(forward, BACKWARD_PER_FORWARD * forward,
                               micro_batch * (row.out_bytes + per_image) + 4 * len(table)))
    return costs


def plan_run(cfg: RunConfig, ranks: int, micro_batches: int, micro_batch: int | None = None,
             bandwidth_gbs: float = 10.0, repeats: int = 0, tflops: float = 10.0) -> tuple[str, pd.DataFrame]:
    """(a heading line, `plan_table`) for `cfg`'s model: from counted FLOPs at `tflops` TFLOP/s, or with
    `repeats` > 0 from timing every stage `repeats` times on `train.device`; `micro_batch` defaults to
    `train.batch_size / micro_batches`. Bad values fail before anything is counted or measured."""
    stages = len(cfg.model.taps)
    if not 1 <= ranks <= stages:
        raise ValueError(f"--pipeline-stages must be between 1 and the model's {stages} stages, got {ranks}")
    if micro_batches < 1:
        raise ValueError(f"--micro-batches must be >= 1, got {micro_batches}")
    micro_batch = cfg.train.batch_size // micro_batches if micro_batch is None else micro_batch
    if micro_batch < 1:
        raise ValueError(f"--micro-batch-size must be >= 1 (train.batch_size {cfg.train.batch_size} over "
                         f"{micro_batches} micro-batches is {micro_batch}); pass --micro-batch-size")
    if not bandwidth_gbs > 0:
        raise ValueError(f"--bandwidth-gbs must be > 0, got {bandwidth_gbs}")
    if not tflops > 0:
        raise ValueError(f"--tflops must be > 0, got {tflops}")
    device = resolve_device(cfg.train.device)
    model = StagewiseEncoder(cfg.model).to(device).train()
    if repeats:
        costs = measure_stage_costs(model, micro_batch, repeats)
        source = f"one {device.type} measurement per stage (forward + local backward + AdamW step"
    else:
        costs = counted_stage_costs(cfg, micro_batch, tflops)
        source = (f"counted FLOPs at {tflops:g} TFLOP/s (backward = {BACKWARD_PER_FORWARD:g} forwards, optimizer "
                  "step left out; --measure times the stages instead")
    table = plan_table(model, costs, ranks, micro_batches, micro_batch, Link(bytes_per_s=bandwidth_gbs * 1e9),
                       cfg.train.log_every)
    heading = (f"pipeline of {ranks} ranks, {micro_batches} micro-batches of {micro_batch} images, predicted from "
               f"{source}; sends at {bandwidth_gbs:g} GB/s):")
    return heading, table
