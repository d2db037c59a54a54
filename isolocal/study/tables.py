"""The report's tables from `summary.csv`: mean and 95% t-interval per cell, paired differences to the
baseline, claim verdicts and time to accuracy, as pandas frames of formatted strings."""
from __future__ import annotations

import math

import pandas as pd

from isolocal.study.schema import METRICS, Claim, Study
from isolocal.study.stats import Interval, mean_ci, verdict
from isolocal.study.summary import paired, values

DASH = "–"
# metric -> (decimals, label) in tables; every accuracy names its split
FORMAT = {"loss": (4, "loss"), "loss_total": (4, "total loss"),
          "knn": (2, "k-NN test top-1 %"), "knn_val": (2, "k-NN val top-1 %"),
          "knn_sel": (2, "k-NN test top-1 %, stage chosen on val"), "knn_sel_stage": (1, "k-NN stage chosen on val"),
          "knn_top": (2, "k-NN test top-1 %, last stage"),
          "linear": (2, "linear test top-1 %"), "linear_val": (2, "linear val top-1 %"),
          "linear_sel": (2, "linear test top-1 %, stage chosen on val"),
          "linear_sel_stage": (1, "linear stage chosen on val"), "linear_top": (2, "linear test top-1 %, last stage"),
          "finetune": (2, "fine-tune test top-1 %"), "finetune_val": (2, "fine-tune val top-1 %"),
          "head": (2, "classify head test top-1 %"), "head_val": (2, "classify head val top-1 %"), "head_top": (2, "top classify head test top-1 %"),
          "nmi": (4, "NMI"), "attention_distance": (2, "attention distance (px)"),
          "pretrain_s": (0, "pre-training s"), "epoch_s": (1, "s per epoch"), "img_per_s": (0, "img/s"), "peak_mem_mb": (0, "peak MB")}

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
        kind = METRICS[metric][0]
        digits, label = FORMAT[metric]
        sub = summary[summary["metric"] == metric]
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
        digits, label = FORMAT[metric]
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
                         "p (paired t)": DASH if math.isnan(result.p_value) else f"{result.p_value:.3g}",
                         "seeds": str(d.n)})
    return pd.DataFrame(rows)


def claim_rows(study: Study, summary: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for name, claim in study.claims.items():
        result = paired(summary, claim.a, claim.b, claim.metric, claim.stage, claim.layer)
        d = result.diff
        digits = FORMAT[claim.metric][0] + 1
        rows.append({"claim": name, "statement": claim.statement or DASH, "measure": claim_measure(claim),
                     "a − b": fmt(d.mean, digits),
                     "95% CI": DASH if d.n < 2 else f"[{fmt(d.low, digits)}, {fmt(d.high, digits)}]",
                     "p (paired t)": DASH if math.isnan(result.p_value) else f"{result.p_value:.3g}",
                     "seeds": str(d.n), "holds if CI low >": fmt(0.0 - claim.margin, digits),
                     "verdict": f"**{verdict(d, claim.margin)}**"})
    return pd.DataFrame(rows)


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
