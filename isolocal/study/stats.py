"""Uncertainty over seeds: t-intervals of means, paired differences and claim verdicts (scipy.stats).

With n seeds, a mean's 95% interval is mean +- t(0.975, n-1) * s / sqrt(n) (`scipy.stats.t.interval`
with the standard error `scipy.stats.sem`). Paired differences are per-seed differences of two
variants' runs at the same seed, so the seed-to-seed variation they share (initialisation, data
order, masks) cancels; their p-value is the paired t-test (`scipy.stats.ttest_rel`). One seed gives
a value without an interval (bounds and p are NaN), which the report shows as "no CI".
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    """A mean with its two-sided t-interval over n values (NaN bounds for n < 2)."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


@dataclass(frozen=True)
class PairedDifference:
    """Mean of per-seed differences a - b, its t-interval and the paired t-test p-value."""

    diff: Interval
    p_value: float


def mean_ci(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Mean and t-interval of `values`; identical values give a zero-width interval."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = float(x.mean())
    if x.size < 2:
        return Interval(mean, math.nan, math.nan, 1)
    sem = float(stats.sem(x))
    if sem == 0:
        return Interval(mean, mean, mean, int(x.size))
    low, high = stats.t.interval(confidence, x.size - 1, loc=mean, scale=sem)
    return Interval(mean, float(low), float(high), int(x.size))


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE) -> PairedDifference:
    """a - b per pair (same seed); the p-value tests a mean difference of zero (NaN below 2 pairs
    or when every difference is equal)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired samples need the same length, got {a.size} and {b.size}")
    diff = mean_ci(a - b, confidence)
    p = math.nan
    if a.size >= 2 and np.ptp(a - b) > 0:
        p = float(stats.ttest_rel(a, b).pvalue)
    return PairedDifference(diff, p)


def verdict(diff: Interval, margin: float) -> str:
    """"holds" when the interval of a - b lies above -margin, "fails" when it lies below, else
    "undecided" (also without an interval, i.e. one seed)."""
    if diff.low > -margin:
        return "holds"
    if diff.high < -margin:
        return "fails"
    return "undecided"
