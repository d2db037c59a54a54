"""Run-directory outputs: metrics as JSON lines (and, with `train.tensorboard`, as TensorBoard
scalars), the heads' own logs in them, the resolved config as TOML, peak memory.

The heads' logs (`HeadOutput.logs`) of a training step go into its `step` record as one list per key,
`log_<key>_stage`, like `loss_stage`: per stage the mean over the step's micro-batches and processes,
null for a stage whose head has no such key (a `mim` stage logs nothing).

Peak memory is what the training loop adds, in MiB:
- CUDA: `torch.cuda.max_memory_allocated` since the loop started minus what was allocated at that
  moment (tensors only: gradients, optimizer state, activations; the weights and batches that existed
  before, and allocator caching, excluded), the same quantity as the CPU path measures.
- CPU: the process's peak resident set size (VmHWM) since the loop started minus its resident size
  at that moment. Linux lets a process reset its high-water mark (`/proc/self/clear_refs` <- "5"),
  so this is the true peak of the training loop (activations, gradients, optimizer state), not an
  estimate, and costs nothing per step. It counts real pages, so it includes allocator slack; where
  the reset is not permitted, the mark covers the whole process lifetime and may read high.
"""
from __future__ import annotations

import json
import numbers
import re
import resource
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from isolocal.config import ConfigError, RunConfig, to_dict
from isolocal.config.toml import dumps_toml

METRICS = "metrics.jsonl"
CONFIG = "config.toml"
TENSORBOARD = "tensorboard"  # event files: <out_dir>/tensorboard/


def write_config(cfg: RunConfig, out_dir: Path) -> Path:
    """The resolved config, loadable again with `isolocal pretrain -c <out_dir>/config.toml`."""
    path = out_dir / CONFIG
    path.write_text(dumps_toml(to_dict(cfg)))
    return path


LOG_KEY = re.compile(r"[A-Za-z0-9_]+")  # a head log's name, as it appears in `log_<key>_stage`


class HeadLogs:
    """The heads' logs (`HeadOutput.logs`) since the last `clear`: per (key, stage), the mean over the calls
    of `add`, kept on the device until `read` (a host read, done only when a record is written)."""

    def __init__(self) -> None:
        self.sums: dict[tuple[str, int], Tensor] = {}
        self.counts: dict[tuple[str, int], int] = {}

    def add(self, stage: int, logs: Mapping[str, Tensor | float]) -> None:
        """One forward's logs of `stage`'s head: scalars (0-d or one-element tensors, or numbers)."""
        for key, value in logs.items():
            if not isinstance(key, str) or not LOG_KEY.fullmatch(key):
                raise ValueError(f"stage {stage}'s head logged {key!r}: a log's name holds only letters, digits "
                                 "and underscores")
            value = torch.as_tensor(value).detach()
            if value.numel() != 1:
                raise ValueError(f"stage {stage}'s head logged {key!r} of shape {tuple(value.shape)}: a log is "
                                 "one number")
            value = value.reshape(()).float()
            at = (key, stage)
            self.sums[at] = self.sums[at] + value if at in self.sums else value
            self.counts[at] = self.counts.get(at, 0) + 1

    def clear(self) -> None:
        self.sums.clear()
        self.counts.clear()

    def read(self) -> dict[str, dict[int, float]]:
        """{key: {stage: mean}}, read in one host transfer."""
        if not self.sums:
            return {}
        device = next(iter(self.sums.values())).device
        totals = torch.stack([value.to(device) for value in self.sums.values()]).tolist()
        means: dict[str, dict[int, float]] = {}
        for (key, stage), total in zip(self.sums, totals):
            means.setdefault(key, {})[stage] = total / self.counts[(key, stage)]
        return means


def head_log_fields(ranks: Sequence[Mapping[str, Mapping[int, float]]], num_stages: int) -> dict[str, list]:
    """Every process's `HeadLogs.read()` -> a step record's `log_<key>_stage` lists: per stage, the mean over
    the processes that hold it (data-parallel replicas; a pipeline rank holds only its own stages), None
    where the stage's head has no such key."""
    found: dict[str, list[list[float]]] = {}
    for rank in ranks:
        for key, stages in rank.items():
            per_stage = found.setdefault(key, [[] for _ in range(num_stages)])
            for stage, value in stages.items():
                per_stage[stage].append(value)
    return {f"log_{key}_stage": [statistics.fmean(values) if values else None for values in per_stage]
            for key, per_stage in sorted(found.items())}


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class PeakMemory:
    """Peak memory (MiB) the training loop added since `reset()`; see the module docstring."""

    def __init__(self, device: torch.device):
        self.device = device
        self.base_kib = 0
        self.base_bytes = 0

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base_bytes = torch.cuda.memory_allocated(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base_kib = _rss_kib()
        except OSError:
            self.base_kib = 0

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            return (torch.cuda.max_memory_allocated(self.device) - self.base_bytes) / 2**20
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        return max(peak_kib - self.base_kib, 0) / 1024


def check_tensorboard() -> None:
    """Fail before any work when `train.tensorboard` is on but the optional package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401  optional: train.tensorboard only
    except ImportError:
        raise ConfigError("train.tensorboard = true needs the tensorboard package: "
                          "pip install tensorboard (or isolocal[tensorboard])") from None


class MetricsLog:
    """Append-only JSON lines (`pandas.read_json(path, lines=True)` reads it), mirrored to TensorBoard.

    TensorBoard gets every number of every record as a scalar tagged `<kind>/<key>`, per-stage lists
    one tag per stage (`step/loss_stage/2`), at the record's step (its epoch for epoch-only records).
    """

    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool = False):
        self.path = out_dir / METRICS
        self.enabled = enabled
        self.tensorboard = tensorboard and enabled
        self.writer = None

    def start(self, resume_step: int | None) -> None:
        """A fresh run starts an empty file; a resumed one drops records past its checkpoint (a run
        killed after its last checkpoint logged steps it will now redo), in TensorBoard too."""
        if not self.enabled:
            return
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # optional: train.tensorboard only

            self.writer = SummaryWriter(self.path.parent / TENSORBOARD, purge_step=resume_step)
        if resume_step is None or not self.path.exists():
            self.path.write_text("")
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] < resume_step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            self._scalars(record)

    def _scalars(self, record: dict[str, Any]) -> None:
        kind, step = record["kind"], record.get("step", record.get("epoch"))
        for key, value in record.items():
            if key in ("kind", "step", "epoch"):
                continue
            values = value if isinstance(value, list) else [value]
            for k, v in enumerate(values):
                if isinstance(v, numbers.Real) and not isinstance(v, bool):
                    self.writer.add_scalar(f"{kind}/{key}/{k}" if isinstance(value, list) else f"{kind}/{key}",
                                           v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
