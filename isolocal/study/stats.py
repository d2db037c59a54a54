"""Uncertainty over seeds: t-intervals, paired differences, claim verdicts, Holm and power (scipy.stats).

With n seeds, a mean's 95% interval is mean +- t(0.975, n-1) * s / sqrt(n) (`scipy.stats.t.interval`
with the standard error `scipy.stats.sem`). Paired differences are per-seed differences of two
variants' runs at the same seed, so the seed-to-seed variation they share (initialisation, data
order, masks) cancels; their p-value is the paired t-test (`scipy.stats.ttest_rel`). One seed gives
a value without an interval (bounds and p are NaN), which the report shows as "no CI".

A claim tests the mean difference d against its threshold t (H0: d <= t). Its verdict reads the 95%
interval: "holds" when it lies above t, "fails" when below. That is the one-sided t-test at
ALPHA = 0.025 each way (`one_sided_p` < ALPHA exactly when the lower bound is above t), so the
study's claims share one Holm correction (`holm`) at the same level, and `seeds_for_power` says how
many seeds the test needs to decide at the observed spread.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
ALPHA = (1 - CONFIDENCE) / 2  # the one-sided level of the interval rule: 0.025
POWER = 0.8
MAX_SEEDS = 1000  # seeds_for_power looks no further


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


def verdict(diff: Interval, threshold: float) -> str:
    """"holds" when the interval of a - b lies above `threshold`, "fails" when it lies below, else
    "undecided" (also without an interval, i.e. one seed)."""
    if diff.low > threshold:
        return "holds"
    if diff.high < threshold:
        return "fails"
    return "undecided"


def one_sided_p(differences: Sequence[float], threshold: float) -> float:
    """p-value of H0: mean difference <= `threshold` against "above it": the one-sample t-test
    (`scipy.stats.ttest_1samp`, alternative "greater"). NaN below 2 values. Equal differences have no
    spread to test with, so their mean decides alone: p = 0 when it is above the threshold, 1 otherwise
    (as the interval rule, whose interval is then the single point). The reverse null (mean >= t) is
    `one_sided_p(-differences, -threshold)`."""
    x = np.asarray(differences, dtype=float)
    if x.size < 2:
        return math.nan
    if np.ptp(x) == 0:
        return 0.0 if x[0] > threshold else 1.0
    return float(stats.ttest_1samp(x, threshold, alternative="greater").pvalue)


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm-adjusted p-values (Holm 1979, "A simple sequentially rejective multiple test procedure",
    Scand. J. Statist. 6:65-70): the k-th smallest of m p-values is scaled by m - k + 1 and kept no
    smaller than the one before it (capped at 1). Rejecting where the adjusted value is below alpha is
    Holm's step-down test, which keeps the chance of any false rejection among the m nulls at most
    alpha. A NaN p (a hypothesis without a test) counts as 1: it is one of the m, never rejected."""
    p = np.nan_to_num(np.asarray(p_values, dtype=float), nan=1.0)
    order = np.argsort(p, kind="stable")
    scaled = p[order] * (p.size - np.arange(p.size))
    adjusted = np.empty_like(p)
    adjusted[order] = np.minimum(np.maximum.accumulate(scaled), 1.0)
    return adjusted


def t_test_power(distance: float, sd: float, seeds: int | np.ndarray, alpha: float = ALPHA) -> float | np.ndarray:
    """Power of the one-sided one-sample t-test at level `alpha` with `seeds` values (an int or an
    array of counts) of spread `sd`, when the true mean lies `distance` beyond the null's boundary: the
    noncentral t's mass above the test's critical value, noncentrality distance * sqrt(n) / sd
    (`scipy.stats.nct`)."""
    n = np.asarray(seeds)
    power = stats.nct.sf(stats.t.ppf(1 - alpha, n - 1), n - 1, distance * np.sqrt(n) / sd)
    return float(power) if power.ndim == 0 else power


def seeds_for_power(distance: float, sd: float, power: float = POWER, alpha: float = ALPHA,
                    max_seeds: int = MAX_SEEDS) -> int | None:
    """The fewest seeds (>= 2) with which the one-sided t-test at `alpha` decides a claim with
    probability `power`, when the true mean difference lies `distance` = |d - t| from the threshold
    and the per-seed differences spread with standard deviation `sd`. None when no count up to
    `max_seeds` does (distance 0 never does). sd = 0 (differences without spread) needs 2.

    E.g. distance / sd = 1 needs 10 seeds, 0.5 needs 34 (the one-sample t-test's textbook values)."""
    if distance < 0 or sd < 0:
        raise ValueError(f"distance and sd must be >= 0, got {distance} and {sd}")
    if distance == 0:
        return None
    if sd == 0:
        return 2
    n = np.arange(2, max_seeds + 1)
    reached = t_test_power(distance, sd, n, alpha) >= power
    return int(n[reached.argmax()]) if reached.any() else None
