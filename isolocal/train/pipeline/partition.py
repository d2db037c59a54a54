"""Which contiguous stages each pipeline rank runs: by parameter count or by measured time.

- "count": balance trainable parameter counts (DeepSpeed's `partition_balanced`), the partition
  every pipeline run used before this option existed;
- "cost": minimise the busiest rank's measured time per step (`costmodel.rank_loads`), which is what
  bounds an isolated pipeline's throughput (stages of equal size differ in time: their targets, heads
  and the first rank's data loading).
Pure Python: `isolocal info` plans with it without starting DeepSpeed.
"""
from __future__ import annotations

import functools

from isolocal.train.pipeline.costmodel import StageCost, rank_loads


def cost_parts(costs: list[StageCost], ranks: int, micro_batches: int = 1, data_s: float = 0.0) -> list[int]:
    """Boundaries [0, ..., n] giving each of `ranks` ranks at least one stage, minimising the busiest
    rank's load (exhaustive over contiguous splits by dynamic programming; ties: the earlier split)."""
    n = len(costs)
    if not 1 <= ranks <= n:
        raise ValueError(f"pipeline stages must be between 1 and the model's {n} stages, got {ranks}")

    def load(start: int, stop: int) -> float:
        first = data_s if start == 0 else 0.0
        return rank_loads(costs[start:stop], [0, stop - start], micro_batches, first)[0]

    @functools.cache
    def best(start: int, left: int) -> tuple[float, tuple[int, ...]]:
        """(busiest load, boundaries after `start`) for stages start.. on `left` ranks."""
        if left == 1:
            return load(start, n), (n,)
        options = []
        for stop in range(start + 1, n - left + 2):
            rest, cuts = best(stop, left - 1)
            options.append((max(load(start, stop), rest), (stop, *cuts)))
        return min(options, key=lambda o: o[0])

    return [0, *best(0, ranks)[1]]


def describe(parts: list[int], costs: list[StageCost], micro_batches: int, data_s: float = 0.0) -> str:
    """One line: each rank's stages and share of the work, and the balance bound."""
    loads = rank_loads(costs, parts, micro_batches, data_s)
    ranks = ", ".join(f"rank {r}: stages {parts[r]}-{parts[r + 1] - 1} ({load / sum(loads):.0%})"
                      for r, load in enumerate(loads))
    return f"{ranks}; balance bound {sum(loads) / max(loads):.2f}x of one worker (ideal {len(loads)}x)"
