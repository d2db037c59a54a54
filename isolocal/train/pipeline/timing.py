"""Where a pipeline's time goes: per-stage costs for the cost model, and a per-rank breakdown of a run.

- `measure_stage_costs`: a short profiling pass over a model's stages (forward, local backward,
  optimizer step, bytes sent), the input of `costmodel` and of the "cost" partition;
- `RankTimes`: exclusive time per category on one rank (forward, backward, optimizer, send, recv,
  data, targets, sync), timed around the engine's instructions and the runner's own work
  (`pipeline.profile = true`), plus the spans of a few steps for a timeline. The spans use the
  machine's monotonic clock, which every process shares, so one Chrome trace (and `plot_timeline`'s
  figure) shows all ranks on one time axis (torch.profiler traces one process at a time and adds
  per-op overhead).
"""
from __future__ import annotations

import contextlib
import functools
import json
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd
import torch

from isolocal.models.encoder import StagewiseEncoder
from isolocal.train.pipeline.costmodel import StageCost

CATEGORIES = ("data", "targets", "forward", "backward", "optimizer", "send", "recv", "sync")


def _timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out


def measure_stage_costs(model: StagewiseEncoder, micro_batch: int, repeats: int = 3, seed: int = 0) -> list[StageCost]:
    """Per stage, the median over `repeats` (after one warm-up) of: forward of one micro-batch of
    random images (the stage's targets, blocks, head and loss), its backward (to its input too when
    the boundary in front of it is not isolated), an AdamW step over copies of its parameters, and
    the bytes a rank ending at this stage sends on (x, the loss slots, image bits, mask).

    Leaves the model as it was: no gradients, weights untouched, RNG streams restored (a run that
    profiles at start-up draws the same dropout / drop path as one that does not)."""
    if micro_batch < 1 or repeats < 1:
        raise ValueError(f"micro_batch and repeats must be >= 1, got {micro_batch} and {repeats}")
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    c, s = model.cfg.in_chans, model.img_size
    images = torch.randn(micro_batch * model.views, c, s, s, generator=g).to(device)  # two views: contrastive
    mask = model.random_mask(len(images), generator=g)
    labels = torch.zeros(micro_batch, dtype=torch.long, device=device)  # for classify heads
    costs, x = [], images
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for k, stage in enumerate(model.stages):
            fwd, bwd = [], []
            for _ in range(repeats + 1):
                inp = x.detach().requires_grad_(k > 0 and model.alphas[k - 1] != 0.0)

                def forward(inp: torch.Tensor = inp) -> tuple:
                    return model.stage_step(k, inp, model.prepare(images, mask, [k], labels=labels))

                t_fwd, (out, loss, *_) = _timed(forward, device)
                t_bwd, _ = _timed(loss.backward, device)
                fwd.append(t_fwd)
                bwd.append(t_bwd)
            params = [p for p in stage.parameters() if p.requires_grad]
            for p in params:
                p.grad = None
            sent = out.numel() * out.element_size() + 4 * (model.num_stages + images.numel()) + mask.numel()
            costs.append(StageCost(statistics.median(fwd[1:]), statistics.median(bwd[1:]), sent,
                                   _optimizer_step_s(params, repeats, device)))
            x = out.detach()
    return costs


def _optimizer_step_s(params: list[torch.nn.Parameter], repeats: int, device: torch.device) -> float:
    """Median time of an AdamW step over copies of `params` (the weights themselves stay untouched)."""
    copies = [p.detach().clone().requires_grad_() for p in params]
    for q in copies:
        q.grad = torch.ones_like(q)
    optimizer = torch.optim.AdamW(copies, lr=1e-4)
    times = [_timed(optimizer.step, device)[0] for _ in range(repeats + 1)]
    return statistics.median(times[1:])


class RankTimes:
    """Exclusive seconds per category on this rank (a span's nested spans count in their own
    category, not in it) over whole steps, from the first `mark()` to the last, and the spans of the
    first `trace_steps` of those steps, for a timeline."""

    def __init__(self, rank: int, trace_steps: int = 3):
        self.rank, self.trace_steps = rank, trace_steps
        self.totals: dict[str, float] = defaultdict(float)
        self.counted: dict[str, float] = {}  # `totals` at the last mark
        self.events: list[dict] = []
        self._stack: list[list] = []  # [category, start, seconds in nested spans]
        self.steps, self.started, self.ended = 0, None, None

    def mark(self) -> None:
        """A step starts (the first call, after warm-up steps, starts counting)."""
        now = time.perf_counter()
        if self.started is None:
            self.totals.clear()
            self.started = now
            return
        self.steps += 1
        self.counted, self.ended = dict(self.totals), now

    @contextlib.contextmanager
    def span(self, category: str) -> Iterator[None]:
        entry = [category, time.perf_counter(), 0.0]
        self._stack.append(entry)
        try:
            yield
        finally:
            self._stack.pop()
            end = time.perf_counter()
            seconds = end - entry[1]
            self.totals[category] += seconds - entry[2]
            if self._stack:
                self._stack[-1][2] += seconds
            if self.started is not None and self.steps < self.trace_steps:
                self.events.append({"name": category, "ph": "X", "ts": entry[1] * 1e6, "dur": seconds * 1e6,
                                    "pid": self.rank, "tid": 0})

    def timed(self, category: str, fn: Callable) -> Callable:
        """`fn` (an engine instruction handler or any function) counted in `category`."""
        @functools.wraps(fn)
        def wrapper(*args: object, **kwargs: object) -> object:
            with self.span(category):
                return fn(*args, **kwargs)
        return wrapper

    def summary(self) -> dict:
        """Milliseconds per step per category, the rest of the wall time as "other", and the steps."""
        wall = self.ended - self.started if self.steps else 0.0
        steps = max(self.steps, 1)
        ms = {c: 1e3 * self.counted.get(c, 0.0) / steps for c in CATEGORIES}
        ms["other"] = 1e3 * wall / steps - sum(ms.values())
        return {"rank": self.rank, "steps": self.steps, "step_ms": 1e3 * wall / steps, **ms}


def breakdown_table(summaries: list[dict]) -> pd.DataFrame:
    """One row per rank: ms per step in each category and the step time."""
    return pd.DataFrame(summaries).set_index("rank")


def plot_timeline(path: Path, events: list[dict]) -> None:
    """The trace's spans as a figure: one row per rank, one colour per category, time from the first span."""
    import matplotlib  # heavy: only profiled runs draw a timeline

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after choosing the Agg backend

    start = min(e["ts"] for e in events)
    ranks = sorted({e["pid"] for e in events})
    colours = dict(zip(CATEGORIES, plt.get_cmap("tab10").colors))
    fig, ax = plt.subplots(figsize=(10, 0.6 + 0.5 * len(ranks)))
    for e in sorted(events, key=lambda e: -e["dur"]):  # nested spans last, on top of their parents
        ax.broken_barh([((e["ts"] - start) / 1e3, e["dur"] / 1e3)], (ranks.index(e["pid"]) - 0.4, 0.8),
                       color=colours[e["name"]])
    ax.set_yticks(range(len(ranks)), [f"rank {r}" for r in ranks])
    ax.invert_yaxis()
    ax.set_xlabel("ms")
    ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=c) for c in colours.values()], labels=list(colours),
              ncol=len(colours), loc="lower center", bbox_to_anchor=(0.5, 1.0), fontsize="small", frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_trace(path: Path, events: list[dict]) -> None:
    """A Chrome trace (chrome://tracing, ui.perfetto.dev): one process row per rank."""
    names = [{"name": "process_name", "ph": "M", "pid": pid, "args": {"name": f"rank {pid}"}}
             for pid in sorted({e["pid"] for e in events})]
    path.write_text(json.dumps({"traceEvents": names + events, "displayTimeUnit": "ms"}))
