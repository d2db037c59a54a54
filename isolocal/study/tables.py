"""The report's tables from `summary.csv`: mean and 95% t-interval per cell, paired differences to the
baseline, claim verdicts, the seeds each claim needs (`--plan`) and time to accuracy, as pandas frames
of formatted strings."""
from __future__ import annotations

import math

import pandas as pd

from isolocal.study.claims import ClaimResult, judge_claims
from isolocal.study.schema import Claim, Study, metric_info
from isolocal.study.stats import MAX_SEEDS, POWER, Interval, mean_ci
from isolocal.study.summary import paired, values

DASH = "–"
# metric -> (decimals, label) in tables; every accuracy names its split
FORMAT = {"loss": (4, "loss"), "loss_total": (4, "total loss"),
          "knn": (2, "k-NN test top-1 %"), "knn_val": (2, "k-NN val top-1 %"),
          "knn_sel": (2, "k-NN test top-1 %, stage chosen on val"), "knn_sel_stage": (0, "k-NN stage chosen on val, per seed"),
          "knn_top": (2, "k-NN test top-1 %, last stage"),
          "linear": (2, "linear test top-1 %"), "linear_val": (2, "linear val top-1 %"),
          "linear_sel": (2, "linear test top-1 %, stage chosen on val"),
          "linear_sel_stage": (0, "linear stage chosen on val, per seed"), "linear_top": (2, "linear test top-1 %, last stage"),
          "finetune": (2, "fine-tune test top-1 %"), "finetune_val": (2, "fine-tune val top-1 %"),
          "head": (2, "classify head test top-1 %"), "head_val": (2, "classify head val top-1 %"), "head_top": (2, "top classify head test top-1 %"),
          "nmi": (4, "NMI"), "attention_distance": (2, "attention distance (px)"),
          "pretrain_s": (0, "pre-training s"), "epoch_s": (1, "s per epoch"), "img_per_s": (0, "img/s"), "peak_mem_mb": (0, "peak MB")}


def metric_format(metric: str) -> tuple[int, str]:
    """(decimals, label) of a metric in tables and figures; a head's log `log_<key>` reads "head log <key>"."""
    return FORMAT.get(metric) or (4, f"head log {metric.removeprefix('log_')}")


def fmt(x: float, digits: int) -> str:
    return DASH if x is None or math.isnan(x) else f"{x:.{digits}f}"


def ci_cell(interval: Interval, digits: int, seeds: int) -> str:
    """"mean ± half-width" (95% t-interval over seeds), the value alone for one seed, "–" for none;
    "(n=k)" marks a cell with fewer seeds than the study has."""
    if interval.n == 0:
        return DASH
    text = fmt(interval.mean, digits) if interval.n < 2 else f"{fmt(interval.mean, digits)} ± {fmt(interval.half_width, digits)}"
    return text if interval.n == seeds else f"{text} (n={interval.n})"


def metric_table(summary: pd.DataFrame, variants: list[str], metrics: list[str], seeds: int) -> pd.DataFrame:
    """Rows: variants; columns: per-layer entries of each metric (by tap or encoder layer), then run-level ones."""
    table = pd.DataFrame({"variant": variants})
    for metric in metrics:
        kind = metric_info(metric)[0]
        digits, label = metric_format(metric)
        sub = summary[summary["metric"] == metric]
        if metric.endswith("_sel_stage"):  # which stage each seed chose: a choice, not a quantity to average
            table[label] = [", ".join(str(int(s)) for s in values(summary, v, metric)) or DASH for v in variants]
            continue
        if kind == "run":
            table[label] = [ci_cell(mean_ci(values(summary, v, metric).to_numpy()), digits, seeds) for v in variants]
            continue
        for layer in sorted(sub["layer"].dropna().unique()):
            table[f"layer {layer}"] = [ci_cell(mean_ci(values(summary, v, metric, layer=int(layer)).to_numpy()),
                                               digits, seeds) for v in variants]
    return table


def paired_table(study: Study, summary: pd.DataFrame) -> pd.DataFrame:
    """Per-seed paired differences of every variant to the baseline on the headline numbers."""
    selections = [(m, None) for m in ("knn_sel", "knn_top", "linear_sel", "linear_top", "head_top", "finetune")]
    selections += [("nmi", layer) for layer in study.nmi_layers]
    selections += [(m, None) for m in ("pretrain_s", "epoch_s", "peak_mem_mb")]
    rows = []
    for metric, layer in selections:
        digits, label = metric_format(metric)
        for variant in study.variants:
            if variant == study.baseline:
                continue
            result = paired(summary, variant, study.baseline, metric, layer=layer)
            d = result.diff
            if d.n == 0:
                continue
            rows.append({"metric": label + (f", layer {layer}" if layer else ""), "variant": variant,
                         f"mean (variant − {study.baseline})": fmt(d.mean, digits + 1),
                         "95% CI": DASH if d.n < 2 else f"[{fmt(d.low, digits + 1)}, {fmt(d.high, digits + 1)}]",
                         "p (paired t, two-sided, d = 0)": fmt_p(result.p_value), "seeds": str(d.n)})
    return pd.DataFrame(rows)


def fmt_p(p: float) -> str:
    return DASH if math.isnan(p) else f"{p:.3g}"


P_ONE_SIDED = "one-sided p (H0: a − b ≤ threshold)"
SEEDS_TO_DECIDE = f"seeds to decide ({POWER:.0%} power)"


def claim_rows(study: Study, summary: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for r in judge_claims(study, summary):
        claim, d = r.claim, r.diff
        digits = metric_format(claim.metric)[0] + 1
        rows.append({"claim": r.name, "statement": claim.statement or DASH, "measure": claim_measure(claim),
                     "direction, margin": claim_direction(claim), "a − b": fmt(d.mean, digits),
                     "95% CI": DASH if d.n < 2 else f"[{fmt(d.low, digits)}, {fmt(d.high, digits)}]",
                     P_ONE_SIDED: fmt_p(r.p), "seeds": str(d.n), "floors": floors_cell(r),
                     "verdict": f"**{r.verdict}**", "Holm verdict": f"**{r.holm_verdict}**",
                     SEEDS_TO_DECIDE: seeds_cell(r)})
    return pd.DataFrame(rows)


def plan_table(study: Study, summary: pd.DataFrame) -> pd.DataFrame:
    """`--plan`: per claim, the seeds it has, the mean and sd of its paired differences, its threshold
    and the seeds that would decide it with 80% power."""
    rows = []
    for r in judge_claims(study, summary):
        digits = metric_format(r.claim.metric)[0] + 1
        rows.append({"claim": r.name, "seeds": r.diff.n, "mean a − b": fmt(r.diff.mean, digits),
                     "sd": fmt(r.sd, digits), "threshold": fmt(r.claim.threshold, digits),
                     "verdict": r.verdict, SEEDS_TO_DECIDE: seeds_cell(r)})
    return pd.DataFrame(rows)


def claim_direction(claim: Claim) -> str:
    """"non-inferior, margin 1: a − b > −1" or "superior, margin 0: a − b > 0"."""
    name = "non-inferior" if claim.direction == "noninferior" else "superior"
    threshold = f"{claim.threshold:g}".replace("-", "−")
    return f"{name}, margin {claim.margin:g}: a − b > {threshold}"


def floors_cell(result: ClaimResult) -> str:
    """"–" without floors, "cleared", or the checks that failed ("a not above pixels")."""
    if not result.floors:
        return DASH
    failed = [check.describe() for check in result.floors if not check.cleared]
    return "; ".join(failed) if failed else "cleared"


def seeds_cell(result: ClaimResult) -> str:
    """Seeds for 80% power; "–" below 2 seeds and for an uninformative claim (its verdict waits on the
    floors, not on this test)."""
    if result.diff.n < 2 or not result.informative:
        return DASH
    if result.distance == 0:
        return "not decidable"
    n = result.seeds_needed
    return f"> {MAX_SEEDS}" if n is None else str(n)


def claim_measure(claim: Claim) -> str:
    where = ""
    if claim.stage is not None:
        where = f" stage {claim.stage}"
    elif claim.layer is not None:
        where = f" layer {claim.layer}" if isinstance(claim.layer, int) else f" layers {claim.layer} (mean)"
    return f"{claim.metric}{where}: {claim.a} − {claim.b}"


def time_to_accuracy(study: Study, curves: pd.DataFrame) -> tuple[pd.DataFrame, float]:
    """Each variant's mean (over seeds) wall-clock to first reach the baseline's final online k-NN."""
    mean = curves.groupby(["variant", "epoch"], sort=True)[["time", "knn"]].mean().reset_index()
    base = mean[mean["variant"] == study.baseline]
    if base.empty:
        return pd.DataFrame(), math.nan
    target = float(base["knn"].iloc[-1])

    def reach(curve: pd.DataFrame) -> float:
        hit = curve[curve["knn"] >= target]
        return float(hit["time"].iloc[0]) if len(hit) else math.nan

    base_time = reach(base)
    rows = []
    for variant in study.variants:
        curve = mean[mean["variant"] == variant]
        if curve.empty:
            continue
        t = reach(curve)
        rows.append({"variant": variant, "final online k-NN %": fmt(float(curve["knn"].iloc[-1]), 2),
                     "pre-training s": fmt(float(curve["time"].iloc[-1]), 0),
                     f"s to reach {target:.2f}%": fmt(t, 0) if not math.isnan(t) else "not reached",
                     f"time / {study.baseline}'s": fmt(t / base_time, 2) if not math.isnan(t) else DASH})
    return pd.DataFrame(rows), target
