"""The study's claims judged on `summary.csv`: numbers only (`tables` formats them for the report and `--plan`).

Per claim: the per-seed differences a - b, their 95% interval and the verdict against the claim's
threshold t; the one-sided p of its null H0: d <= t (and of the reverse null d >= t, for "fails");
on an accuracy, whether both sides clear both floors (`schema.FLOORS`), without which the claim is
"uninformative"; the Holm-corrected verdict over the study's informative claims; and the seeds that
would decide it with 80% power if the observed mean and spread were the truth.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from isolocal.study.schema import FLOOR_METRIC, FLOORS, Claim, Study
from isolocal.study.stats import ALPHA, Interval, holm, mean_ci, one_sided_p, seeds_for_power, verdict
from isolocal.study.summary import paired_values, values


@dataclass(frozen=True)
class FloorCheck:
    """One side of an accuracy claim against one floor: the side's number minus the floor's
    `FLOOR_METRIC` number, per seed. Cleared when the 95% interval lies above 0."""

    side: str  # "a" or "b"
    floor: str  # the floor variant
    diff: Interval

    @property
    def cleared(self) -> bool:
        return self.diff.low > 0  # NaN (fewer than 2 seeds) is not cleared

    def describe(self) -> str:
        if self.diff.n < 2:
            return f"{self.side} vs {self.floor}: no CI (n={self.diff.n})"
        return f"{self.side} not above {self.floor}"


@dataclass(frozen=True)
class ClaimResult:
    name: str
    claim: Claim
    diff: Interval  # of the per-seed differences a - b
    sd: float  # their sample standard deviation (NaN below 2 seeds)
    p: float  # one-sided, H0: d <= threshold
    p_fail: float  # one-sided, H0: d >= threshold
    floors: tuple[FloorCheck, ...] | None  # None: not an accuracy, no floors apply
    holm_verdict: str = ""  # set over the whole study by `judge_claims`

    @property
    def informative(self) -> bool:
        return self.floors is None or all(check.cleared for check in self.floors)

    @property
    def verdict(self) -> str:
        """The interval rule against the threshold; "uninformative" when a side does not clear a floor
        (one seed: "undecided", as there is no interval to read either)."""
        if self.diff.n < 2:
            return "undecided"
        return verdict(self.diff, self.claim.threshold) if self.informative else "uninformative"

    @property
    def distance(self) -> float:
        """How far the observed mean lies from the threshold."""
        return abs(self.diff.mean - self.claim.threshold)

    @property
    def seeds_needed(self) -> int | None:
        """Seeds for 80% power at the observed mean and sd (None: not within `stats.MAX_SEEDS`, or not
        decidable at distance 0); only meaningful with 2 seeds or more."""
        return seeds_for_power(self.distance, self.sd) if self.diff.n >= 2 else None


def floor_checks(study: Study, summary: pd.DataFrame, claim: Claim) -> tuple[FloorCheck, ...] | None:
    """Each side that is not itself a floor, against each floor: the side's metric at the claim's
    stage/layer minus the floor's run-level `FLOOR_METRIC` number, paired by seed."""
    if claim.metric not in FLOOR_METRIC:
        return None
    checks = []
    for side, variant in (("a", claim.a), ("b", claim.b)):
        if variant in FLOORS:
            continue
        mine = values(summary, variant, claim.metric, claim.stage, claim.layer)
        for floor in (f for f in FLOORS if f in study.variants):
            ours, theirs = paired_values(mine, values(summary, floor, FLOOR_METRIC[claim.metric]))
            checks.append(FloorCheck(side, floor, mean_ci(ours - theirs)))
    return tuple(checks)


def judge_claim(study: Study, summary: pd.DataFrame, name: str) -> ClaimResult:
    claim = study.claims[name]
    a, b = paired_values(values(summary, claim.a, claim.metric, claim.stage, claim.layer),
                         values(summary, claim.b, claim.metric, claim.stage, claim.layer))
    d = a - b
    return ClaimResult(name, claim, mean_ci(d), float(np.std(d, ddof=1)) if d.size >= 2 else math.nan,
                       one_sided_p(d, claim.threshold), one_sided_p(-d, -claim.threshold),
                       floor_checks(study, summary, claim))


def judge_claims(study: Study, summary: pd.DataFrame) -> list[ClaimResult]:
    """Every claim, with its Holm verdict: Holm at ALPHA over the informative claims, once for their
    "holds" nulls (d <= t) and once for their "fails" nulls (d >= t); uninformative claims are left
    out of both families, as they test nothing; a claim without a p-value (one seed) counts as p = 1."""
    results = [judge_claim(study, summary, name) for name in study.claims]
    family = [r for r in results if r.informative]
    holds = dict(zip((r.name for r in family), holm([r.p for r in family]) < ALPHA))
    fails = dict(zip((r.name for r in family), holm([r.p_fail for r in family]) < ALPHA))

    def holm_verdict(r: ClaimResult) -> str:
        if r.diff.n < 2 or not r.informative:
            return r.verdict
        return "holds" if holds[r.name] else "fails" if fails[r.name] else "undecided"

    return [replace(r, holm_verdict=holm_verdict(r)) for r in results]
