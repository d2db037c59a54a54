"""Comparing two runs that must be the same: their logs without wall-clock fields, their saved state."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from isolocal.io.checkpoint import LAST, load_state

CLOCK = {"time", "img_per_s", "peak_mem_mb", "epoch_time"}  # what differs between identical runs
STATE = ("model", "optimizer", "scheduler", "scaler", "step", "epoch", "step_in_epoch", "last_loss_stage")
RANK_STATE = ("mask_generator", "torch", "epoch_loss_sum")


def steps_logged(out: Path) -> int:
    """How many step records `out/metrics.jsonl` holds so far (0 before it exists): a test's cue to signal a run."""
    path = out / "metrics.jsonl"
    return sum('"kind": "step"' in line for line in path.read_text().splitlines()) if path.exists() else 0


def untimed(out: Path) -> list[dict]:
    """Every log record of `out/metrics.jsonl` without its wall-clock fields (all that is left must be reproducible)."""
    return [{k: v for k, v in json.loads(line).items() if k not in CLOCK}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_equal_state(a, b, where: str = "") -> None:
    """Every tensor, number and nested entry equal (weights, optimizer moments, RNG states)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_equal_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def assert_close_states(expected: dict, got: dict, rel: float = 1e-5, where: str = "") -> None:
    """Every tensor of `got` within `rel` of `expected`'s (relative, by norm): runs that sum in another
    order (a pipeline against one process) agree to rounding, not bit for bit."""
    assert expected.keys() == got.keys(), where
    for key, value in expected.items():
        diff, scale = (got[key] - value).double().norm(), max(float(value.double().norm()), 1e-30)
        assert float(diff) <= rel * scale, (where, key)


def assert_same_run(a: Path, b: Path) -> None:
    """Two single-file runs ended in the same place: every rank's saved state and every log record."""
    sa, sb = load_state(a / LAST), load_state(b / LAST)
    for key in STATE:
        assert_equal_state(sa[key], sb[key], key)
    assert len(sa["ranks"]) == len(sb["ranks"])
    for rank, (ra, rb) in enumerate(zip(sa["ranks"], sb["ranks"])):
        for key in RANK_STATE:
            assert_equal_state(ra[key], rb[key], f"ranks[{rank}].{key}")
    assert untimed(a) == untimed(b)
