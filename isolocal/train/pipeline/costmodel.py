"""Predicted step time and bubble of a pipeline from per-stage costs: plan a run before launching it.

Pure Python (no torch, no DeepSpeed), so it can be tested on hand-computed schedules and used by
`isolocal info` for any preset. The inputs are per micro-batch: each stage's forward time (its targets,
blocks, local head and loss), its backward time and the bytes it hands to the next rank, plus its
optimizer step per optimizer step. A rank runs a contiguous range of stages (`parts`, as in
`isolocal.train.pipeline.module`).

The model is a list schedule simulated event by event, for each of `isolocal.config.schedule.SCHEDULES`:
- "isolated" (`IsolatedScheduleEngine`): per micro-batch each rank receives (or, the first, loads),
  runs its stages forward, sends, back-propagates its local losses; then the optimizer step. Nothing
  goes back upstream.
- "1f1b" (DeepSpeed's `TrainSchedule`, global boundaries): per rank, `S - r - 1` warm-up forwards,
  then one forward / one backward, then the remaining backwards; a backward waits for the gradient of
  the next rank's backward of the same micro-batch.
A message costs `link.seconds(bytes)` between the end of the sender's work and the receiver's start;
the sender goes on at once (asynchronous sends; back-pressure is not modelled, which changes no
steady state since the slowest rank sets it anyway). `sync_every` = k puts a barrier after every
k-th step (a pipeline-wide collective: the trainer's log step, or DeepSpeed's loss broadcast, which
ends every default-schedule step: k = 1); 0 = never.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from isolocal.config.schedule import ISOLATED, ONE_F_ONE_B, SCHEDULES


@dataclass(frozen=True)
class StageCost:
    """One stage, per micro-batch (seconds, bytes); `step_s` per optimizer step."""

    forward_s: float
    backward_s: float
    activation_bytes: int = 0  # what goes to the next rank when this stage is a rank's last
    step_s: float = 0.0


@dataclass(frozen=True)
class Link:
    """Point-to-point transfer time: latency plus bytes over bandwidth."""

    latency_s: float = 0.0
    bytes_per_s: float = math.inf

    def seconds(self, nbytes: int) -> float:
        return self.latency_s + nbytes / self.bytes_per_s


@dataclass(frozen=True)
class Prediction:
    step_s: float  # steady-state time per optimizer step
    bubble: float  # fraction of rank-time spent idle: 1 - mean busy / step_s
    busy_s: tuple[float, ...]  # per rank, compute per step
    bound: float  # balance bound: one worker's step over the busiest rank's (ideal speed-up)

    @property
    def speedup(self) -> float:
        """Predicted throughput over one worker running every stage (without communication)."""
        return sum(self.busy_s) / self.step_s


def rank_loads(costs: list[StageCost], parts: list[int], micro_batches: int, data_s: float = 0.0) -> list[float]:
    """Compute per optimizer step of each rank (the first also loads `data_s` per micro-batch)."""
    loads = []
    for r in range(len(parts) - 1):
        own = costs[parts[r]:parts[r + 1]]
        loads.append(micro_batches * (sum(c.forward_s + c.backward_s for c in own) + (data_s if r == 0 else 0.0))
                     + sum(c.step_s for c in own))
    return loads


def balance_bound(costs: list[StageCost], parts: list[int], micro_batches: int = 1, data_s: float = 0.0) -> float:
    """One worker's work over the busiest rank's: the speed-up a perfect schedule would reach."""
    loads = rank_loads(costs, parts, micro_batches, data_s)
    return sum(loads) / max(loads)


def rank_order(schedule: str, rank: int, ranks: int, micro_batches: int) -> list[tuple[str, int]]:
    """The (kind, micro-batch) work items of one rank in one step, kind "F" or "B"."""
    if schedule == ISOLATED:
        return [(kind, m) for m in range(micro_batches) for kind in ("F", "B")]
    warmup = min(ranks - rank - 1, micro_batches)
    order = [("F", m) for m in range(warmup)]
    for m in range(micro_batches - warmup):
        order += [("F", m + warmup), ("B", m)]
    return order + [("B", m) for m in range(micro_batches - warmup, micro_batches)]


def simulate(costs: list[StageCost], parts: list[int], micro_batches: int, schedule: str, link: Link = Link(),
             steps: int = 1, sync_every: int = 1, data_s: float = 0.0) -> list[list[float]]:
    """End time of every step on every rank ([step][rank]) for `steps` steps from time 0."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    ranks = len(parts) - 1
    fwd = [sum(c.forward_s for c in costs[parts[r]:parts[r + 1]]) + (data_s if r == 0 else 0.0) for r in range(ranks)]
    bwd = [sum(c.backward_s for c in costs[parts[r]:parts[r + 1]]) for r in range(ranks)]
    opt = [sum(c.step_s for c in costs[parts[r]:parts[r + 1]]) for r in range(ranks)]
    hop = [link.seconds(costs[parts[r + 1] - 1].activation_bytes) for r in range(ranks - 1)]
    free = [0.0] * ranks
    ends = []
    for step in range(steps):
        done: dict[tuple[str, int, int], float] = {}  # (kind, rank, micro-batch) -> end time
        queues = [rank_order(schedule, r, ranks, micro_batches) for r in range(ranks)]
        while any(queues):
            progressed = False
            for r in range(ranks):
                while queues[r]:
                    kind, m = queues[r][0]
                    ready = _ready(kind, r, m, ranks, schedule, done, hop)
                    if ready is None:
                        break
                    start = max(free[r], ready)
                    free[r] = start + (fwd[r] if kind == "F" else bwd[r])
                    done[kind, r, m] = free[r]
                    queues[r].pop(0)
                    progressed = True
            if not progressed:
                raise RuntimeError(f"the {schedule} schedule deadlocks (a bug in rank_order)")
        free = [f + o for f, o in zip(free, opt)]
        if sync_every and (step + 1) % sync_every == 0:
            free = [max(free)] * ranks
        ends.append(list(free))
    return ends


def _ready(kind: str, r: int, m: int, ranks: int, schedule: str, done: dict, hop: list[float]) -> float | None:
    """When the input of a work item has arrived (None: its producer has not run yet)."""
    if kind == "F":
        source = ("F", r - 1, m) if r > 0 else None
        delay = hop[r - 1] if r > 0 else 0.0
    else:
        source = ("B", r + 1, m) if schedule == ONE_F_ONE_B and r < ranks - 1 else ("F", r, m)
        delay = hop[r] if source[1] != r else 0.0
    if source is None:
        return 0.0
    return done[source] + delay if source in done else None


def sync_every_of(schedule: str, log_every: int) -> int:
    """Steps between pipeline-wide syncs in a run: the isolated schedule syncs only at log steps
    (`train.log_every`); DeepSpeed's 1F1B ends every step with a pipeline-wide loss broadcast."""
    return log_every if schedule == ISOLATED else 1


def predict(costs: list[StageCost], parts: list[int], micro_batches: int, schedule: str, link: Link = Link(),
            sync_every: int = 1, data_s: float = 0.0) -> Prediction:
    """Steady-state step time and bubble: simulate enough steps that the first (filling) ones no
    longer count, and average over whole `sync_every` periods."""
    if micro_batches < 1:
        raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
    if len(parts) < 2 or parts[0] != 0 or parts[-1] != len(costs) or any(b <= a for a, b in zip(parts, parts[1:])):
        raise ValueError(f"parts {parts} must be increasing stage indices from 0 to {len(costs)}")
    period = max(sync_every, 1)
    warm = period * max(1, math.ceil(len(parts) / period))
    ends = simulate(costs, parts, micro_batches, schedule, link, warm + 4 * period, sync_every, data_s)
    step_s = (max(ends[-1]) - max(ends[warm - 1])) / (4 * period)
    busy = tuple(rank_loads(costs, parts, micro_batches, data_s))
    return Prediction(step_s=step_s, bubble=1 - sum(busy) / (len(busy) * step_s), busy_s=busy,
                      bound=sum(busy) / max(busy))
