"""A study's report, built only from the files its runs saved (so `--report-only` is the same code).

- `summary.csv`: long form, one row per number: `variant, seed, metric, stage, layer, value`
  (`stage`: stage index for per-stage metrics; `layer`: the 1-based encoder layer the number reads,
  i.e. the stage's tap layer, or the layer of NMI / attention distance; both empty for run-level
  numbers). `pandas.read_csv` reads it as is.
- `report.md`: one table per metric family (losses, k-NN, linear, fine-tune, NMI, attention
  distance, cost) with mean +- 95% t-interval half-width over seeds and "–" where a value does not
  apply; paired differences to the baseline; claim verdicts; time to accuracy; figures.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from isolocal.study.job import ANALYSIS, FINETUNE, LOG, PRETRAIN, PROBES, RESULT, RUN_SPEC, read_json
from isolocal.heads import StagePlan
from isolocal.study.schema import METRICS, Claim, Run, Study, resolve_run
from isolocal.study.stats import CONFIDENCE, Interval, mean_ci, paired_difference, verdict

COLUMNS = ["variant", "seed", "metric", "stage", "layer", "value"]
DASH = "–"
# metric -> (decimals, label) in tables
FORMAT = {"loss": (4, "loss"), "loss_total": (4, "total loss"), "knn": (2, "k-NN top-1 %"),
          "knn_best": (2, "best-stage k-NN top-1 %"), "linear": (2, "linear top-1 %"),
          "linear_best": (2, "best-stage linear top-1 %"), "finetune": (2, "fine-tune top-1 %"),
          "head": (2, "classify head top-1 %"), "head_top": (2, "top classify head top-1 %"),
          "nmi": (4, "NMI"), "attention_distance": (2, "attention distance (px)"),
          "pretrain_s": (0, "pre-training s"), "epoch_s": (1, "s per epoch"), "img_per_s": (0, "img/s"), "peak_mem_mb": (0, "peak MB")}


# ---------------------------------------------------------------------------------------------- reading runs


def read_metrics(run_dir: Path) -> pd.DataFrame:
    path = run_dir / "metrics.jsonl"
    return pd.read_json(path, lines=True) if path.exists() and path.stat().st_size else pd.DataFrame()


def run_status(run: Run) -> dict:
    """result.json of a run, or a "missing" record when it never ran to the end."""
    path = run.dir / RESULT
    return read_json(path) if path.exists() else {"status": "missing", "error": "not run yet"}


def run_rows(run: Run) -> list[dict]:
    """Every number of one finished run, in long form."""
    spec = read_json(run.dir / RUN_SPEC)
    taps = spec["config"]["model"]["taps"]
    rows: list[dict] = []

    def add(metric: str, value: float, stage: int | None = None, layer: int | None = None) -> None:
        rows.append({"variant": run.variant, "seed": run.seed, "metric": metric, "stage": stage, "layer": layer,
                     "value": float(value)})

    if (run.dir / PRETRAIN).exists():
        metrics = read_metrics(run.dir)
        steps = metrics.query("kind == 'step'")
        epochs = metrics.query("kind == 'epoch'")
        last = (epochs if len(epochs) else steps).iloc[-1]  # the last epoch's mean losses, when it ended
        for k, loss in enumerate(last["loss_stage"]):
            add("loss", loss, k, taps[k] + 1)
        add("loss_total", last["loss"])
    if (run.dir / PROBES).exists():
        results = read_json(run.dir / PROBES)["results"]
        for mode in ("knn", "linear"):
            if f"{mode}_top1" in results[0]:
                for r in results:
                    add(mode, r[f"{mode}_top1"], r["stage"], r["tap"] + 1)
                add(f"{mode}_best", max(r[f"{mode}_top1"] for r in results))
        for r in results:  # only stages with a classify head have one
            if "head_top1" in r:
                add("head", r["head_top1"], r["stage"], r["tap"] + 1)
        if "head_top1" in results[-1]:
            add("head_top", results[-1]["head_top1"])
    if (run.dir / FINETUNE).exists():
        add("finetune", read_json(run.dir / FINETUNE)["results"][0]["finetune_top1"])
    analysis = pd.read_csv(run.dir / ANALYSIS)
    for metric in ("nmi", "attention_distance"):
        for layer, value in zip(analysis["layer"], analysis[metric]):
            add(metric, value, layer=int(layer))
    if (run.dir / PRETRAIN).exists():
        add("pretrain_s", read_json(run.dir / PRETRAIN)["time"])
        if len(epochs):  # wall-clock per epoch, the median over epochs (ends of consecutive epoch records)
            add("epoch_s", np.median(np.diff(epochs["time"].to_numpy(), prepend=0.0)))
        add("img_per_s", steps["img_per_s"].median())
        add("peak_mem_mb", steps["peak_mem_mb"].max())
    return rows


def summary_frame(runs: Sequence[Run]) -> pd.DataFrame:
    rows = [row for run in runs for row in run_rows(run)]
    frame = pd.DataFrame(rows, columns=COLUMNS)
    for col in ("stage", "layer"):
        frame[col] = frame[col].astype("Int64")
    return frame


def values(summary: pd.DataFrame, variant: str, metric: str, stage: int | list[int] | None = None,
           layer: int | list[int] | None = None) -> pd.Series:
    """One number per seed (index): the metric at `stage` or `layer`, a list meaning the mean over it
    (seeds missing one of the listed entries are left out)."""
    rows = summary[(summary["variant"] == variant) & (summary["metric"] == metric)]
    for col, want in (("stage", stage), ("layer", layer)):
        if want is not None:
            want = want if isinstance(want, list) else [want]
            rows = rows[rows[col].isin(want)]
            complete = rows.groupby("seed")[col].transform("count") == len(want)
            rows = rows[complete]
    return rows.groupby("seed", sort=False)["value"].mean()


def paired(summary: pd.DataFrame, a: str, b: str, metric: str, stage: int | list[int] | None = None,
           layer: int | list[int] | None = None):
    """Paired difference a - b over the seeds both variants have."""
    va, vb = values(summary, a, metric, stage, layer), values(summary, b, metric, stage, layer)
    seeds = [s for s in va.index if s in vb.index]
    return paired_difference(va[seeds].to_numpy(), vb[seeds].to_numpy())


# ---------------------------------------------------------------------------------------------- cells and tables


def fmt(x: float, digits: int) -> str:
    return DASH if x is None or math.isnan(x) else f"{x:.{digits}f}"


def ci_cell(interval: Interval, digits: int, seeds: int) -> str:
    """"mean ± half-width" (95% t-interval over seeds), the value alone for one seed, "–" for none;
    "(n=k)" marks a cell with fewer seeds than the study has."""
    if interval.n == 0:
        return DASH
    text = fmt(interval.mean, digits) if interval.n < 2 else f"{fmt(interval.mean, digits)} ± {fmt(interval.half_width, digits)}"
    return text if interval.n == seeds else f"{text} (n={interval.n})"


def _markdown(table: pd.DataFrame, names: int = 1) -> str:
    """A pipe table: the first `names` columns left-aligned, the numbers right-aligned."""
    align = ("left",) * names + ("right",) * (table.shape[1] - names)
    return table.to_markdown(index=False, colalign=align, disable_numparse=True)


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
    selections = [(m, None) for m in ("knn_best", "linear_best", "head_top", "finetune")]
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


# ---------------------------------------------------------------------------------------------- time to accuracy


def online_knn(runs: Sequence[Run]) -> pd.DataFrame:
    """Best-stage online k-NN per logged epoch: columns variant, seed, epoch, time, knn."""
    frames = []
    for run in runs:
        metrics = read_metrics(run.dir)
        if "kind" not in metrics or not (metrics["kind"] == "knn").any():
            continue
        knn = metrics[metrics["kind"] == "knn"]
        frames.append(pd.DataFrame({"variant": run.variant, "seed": run.seed, "epoch": knn["epoch"].to_numpy(),
                                    "time": knn["time"].to_numpy(),
                                    "knn": knn.filter(like="knn_top1_stage").max(axis=1).to_numpy()}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["variant", "seed", "epoch", "time", "knn"])


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


# ---------------------------------------------------------------------------------------------- figures


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120, bbox_inches="tight", metadata={"Software": None})
    return path


def _band(ax, x: np.ndarray, groups: list[np.ndarray], label: str, color: str) -> None:
    """Mean line with its 95% t-interval band (no band for one seed)."""
    cis = [mean_ci(g) for g in groups]
    ax.plot(x, [c.mean for c in cis], marker="o", ms=3, label=label, color=color)
    if all(c.n >= 2 for c in cis):
        ax.fill_between(x, [c.low for c in cis], [c.high for c in cis], color=color, alpha=0.2, lw=0)


def plot_depth(summary: pd.DataFrame, variants: list[str], metric: str, path: Path) -> Path:
    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    for i, variant in enumerate(variants):
        sub = summary[(summary["variant"] == variant) & (summary["metric"] == metric)]
        if sub.empty:
            continue
        layers = sorted(sub["layer"].unique())
        _band(ax, np.array(layers, dtype=float), [sub[sub["layer"] == l]["value"].to_numpy() for l in layers],
              variant, f"C{i}")
    ax.set_xlabel("layer")
    ax.set_ylabel(FORMAT[metric][1])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_losses(study: Study, runs: Sequence[Run], path: Path) -> Path | None:
    """One panel per tap layer (top-only runs land in the top layer's panel), mean over seeds."""
    curves = []
    for run in runs:
        if not (run.dir / PRETRAIN).exists():
            continue
        taps = read_json(run.dir / RUN_SPEC)["config"]["model"]["taps"]
        steps = read_metrics(run.dir).query("kind == 'step'")
        for k, tap in enumerate(taps):
            curves.append(pd.DataFrame({"variant": run.variant, "layer": tap + 1, "step": steps["step"].to_numpy(),
                                        "loss": [s[k] for s in steps["loss_stage"]]}))
    if not curves:
        return None
    data = pd.concat(curves).groupby(["variant", "layer", "step"])["loss"].mean().reset_index()
    layers = sorted(data["layer"].unique())
    fig = Figure(figsize=(3.2 * len(layers), 2.8))
    axes = fig.subplots(1, len(layers), squeeze=False)[0]
    for i, variant in enumerate(study.variants):
        for ax, layer in zip(axes, layers):
            sub = data[(data["variant"] == variant) & (data["layer"] == layer)]
            if len(sub):
                ax.plot(sub["step"], sub["loss"], color=f"C{i}", label=variant)
    for ax, layer in zip(axes, layers):
        ax.set_title(f"loss of the stage tapped at layer {layer}", fontsize=8)
        ax.set_xlabel("step")
    axes[-1].legend(fontsize=7)
    return _save(fig, path)


def plot_online_knn(study: Study, curves: pd.DataFrame, path: Path) -> Path:
    fig = Figure(figsize=(9, 3.4))
    by_epoch, by_time = fig.subplots(1, 2)
    for i, variant in enumerate(study.variants):
        sub = curves[curves["variant"] == variant]
        if sub.empty:
            continue
        epochs = sorted(sub["epoch"].unique())
        _band(by_epoch, np.array(epochs, dtype=float), [sub[sub["epoch"] == e]["knn"].to_numpy() for e in epochs],
              variant, f"C{i}")
        mean = sub.groupby("epoch")[["time", "knn"]].mean()
        by_time.plot(mean["time"], mean["knn"], marker="o", ms=3, color=f"C{i}", label=variant)
    by_epoch.set_xlabel("epoch")
    by_time.set_xlabel("pre-training wall-clock (s)")
    for ax in (by_epoch, by_time):
        ax.set_ylabel("best-stage online k-NN top-1 %")
        ax.grid(alpha=0.3)
    by_time.legend(fontsize=7)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------- the report


def build_report(study: Study) -> Path:
    """Write summary.csv, the figures and report.md into the study's directory; returns report.md."""
    out = study.root
    out.mkdir(parents=True, exist_ok=True)
    runs = study.runs()
    status = {run: run_status(run) for run in runs}
    ok = [run for run in runs if status[run]["status"] == "ok"]
    summary = summary_frame(ok)
    summary.to_csv(out / "summary.csv", index=False)
    variants = list(study.variants)
    seeds = len(study.seeds or [None])
    lines = [f"# Study: {study.name}", ""]
    lines += _preamble(study, runs, ok, status)
    families = [("Pre-training losses (mean over the last epoch, per stage by its tap layer)", ["loss", "loss_total"]),
                ("k-NN top-1 % (per stage by its tap layer)", ["knn", "knn_best"]),
                ("Linear probe top-1 % (per stage by its tap layer)", ["linear", "linear_best"]),
                ("Classify heads' own top-1 % (per stage with one; top = the model's prediction)", ["head", "head_top"]),
                ("Fine-tuning top-1 % (whole encoder)", ["finetune"]),
                ("Query/key NMI per encoder layer", ["nmi"]),
                ("Mean attention distance per encoder layer (pixels)", ["attention_distance"]),
                ("Cost of pre-training", ["pretrain_s", "epoch_s", "img_per_s", "peak_mem_mb"])]
    for title, metrics in families:
        if not summary["metric"].isin(metrics).any():
            continue
        lines += [f"## {title}", "", _markdown(metric_table(summary, variants, metrics, seeds)), ""]
    lines += _paired_section(study, summary)
    lines += _claims_section(study, summary)
    lines += _time_section(study, ok, out)
    lines += _figures_section(study, summary, ok, status, out)
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report


def _preamble(study: Study, runs: list[Run], ok: list[Run], status: dict) -> list[str]:
    seeds = study.seeds
    lines = [f"Variants: {', '.join(study.variants)}; baseline: {study.baseline}; evaluations: "
             f"{', '.join(study.evals)}. Runs with the same seed share the initialisation seed, data order "
             f"and masks; controls ({', '.join(v for v, p in study.pretrain.items() if not p) or 'none'}) are "
             f"evaluated at that initialisation without pre-training.", ""]
    lines += _heads_section(study)
    if seeds is None or len(seeds) < 2:
        lines += ["**One seed per variant: values below have no confidence intervals and claims stay "
                  "undecided.** Set `study.seeds` (e.g. `[0, 1, 2]`) to measure them.", ""]
    else:
        lines += [f"Seeds {', '.join(map(str, seeds))}. Cells are mean ± half-width of the {CONFIDENCE:.0%} "
                  "t-interval over seeds (`scipy.stats.t.interval`); `(n=k)` marks cells with fewer finished "
                  "seeds; – means the value does not apply.", ""]
    lines += [f"{len(ok)} of {len(runs)} runs finished. Every number is read from `summary.csv` "
              "(long form: variant, seed, metric, stage, layer, value), built from each run's files under "
              "`runs/<variant>/" + ("seed<k>/" if seeds is not None else "") + "`.", ""]
    for run in runs:
        st = status[run]
        if st["status"] == "failed":
            lines += [f"**{run.label} failed**: {st['error']} (see `{run.dir.relative_to(study.root)}/{LOG}`)", ""]
    missing = [run.label for run in runs if status[run]["status"] == "missing"]
    if missing:
        lines += [f"Not run yet: {', '.join(missing)}.", ""]
    return lines


def heads_per_stage(study: Study, variant: str) -> str:
    """Which head (`model.objective`) trained which stages of a variant, and across which boundaries."""
    model = resolve_run(study, variant).model
    stages: dict[str, list[int]] = {}
    for k, name in enumerate(StagePlan.from_config(model).objectives):
        stages.setdefault(name, []).append(k)
    heads = "; ".join(f"{name} (stage{'s' if len(ks) > 1 else ''} {', '.join(map(str, ks))})"
                      for name, ks in stages.items())
    return f"{heads}; boundary {model.boundary!r}"


def _heads_section(study: Study) -> list[str]:
    lines = ["Heads per stage (`model.objective`; controls are not trained by them):", ""]
    return lines + [f"- {v}: {heads_per_stage(study, v)}" for v in study.variants] + [""]


def _paired_section(study: Study, summary: pd.DataFrame) -> list[str]:
    table = paired_table(study, summary)
    if table.empty:
        return []
    return [f"## Paired differences to the baseline ({study.baseline})", "",
            "Per seed, variant minus baseline at the same seed; mean, its 95% t-interval and the paired "
            "t-test p-value (`scipy.stats.ttest_rel`).", "", _markdown(table, names=2), ""]


def _claims_section(study: Study, summary: pd.DataFrame) -> list[str]:
    if not study.claims:
        return []
    return ["## Claims", "",
            "A claim holds when the lower bound of the 95% interval of a − b (paired by seed) is above "
            "−margin, fails when the upper bound is below −margin, and is undecided otherwise.", "",
            _markdown(claim_rows(study, summary), names=3), ""]


def _time_section(study: Study, ok: list[Run], out: Path) -> list[str]:
    curves = online_knn(ok)
    if curves.empty:
        return []
    lines = ["## Time to accuracy (online k-NN during pre-training)", "",
             "Best-stage online k-NN, mean over seeds, against epochs (95% band) and against pre-training "
             "wall-clock (which includes the online evaluations themselves).", ""]
    table, target = time_to_accuracy(study, curves)
    if not table.empty:
        lines += [f"Wall-clock for each variant's mean curve to first reach the baseline's final online k-NN "
                  f"({target:.2f}%, {study.baseline}), and its ratio to the baseline's own time to that accuracy.",
                  "", _markdown(table), ""]
    path = plot_online_knn(study, curves, out / "online_knn.png")
    return lines + [f"![online k-NN]({path.name})", ""]


def _figures_section(study: Study, summary: pd.DataFrame, ok: list[Run], status: dict, out: Path) -> list[str]:
    lines = []
    figures = [plot_losses(study, ok, out / "loss_curves.png")]
    variants = list(study.variants)
    for metric in ("nmi", "attention_distance"):
        if (summary["metric"] == metric).any():
            figures.append(plot_depth(summary, variants, metric, out / f"{metric}_vs_depth.png"))
    figures = [f for f in figures if f is not None]
    if figures:
        lines += ["## Figures", "", "Loss curves are means over seeds; depth curves carry 95% t-interval bands.", ""]
        lines += [f"![{f.stem}]({f.name})" for f in figures] + [""]
    first: dict[str, Run] = {}
    for run in ok:
        first.setdefault(run.variant, run)
    names: list[str] = []
    for run in first.values():
        names += [n for n in status[run].get("figures", []) if n not in names]
    for name in names:
        shown = [(v, r) for v, r in first.items() if name in status[r].get("figures", [])]
        lines += [f"### {Path(name).stem.replace('_', ' ')} (first finished seed of each variant)", "",
                  "| " + " | ".join(r.label for _, r in shown) + " |", "|" + "---|" * len(shown),
                  "| " + " | ".join(f"![{v}]({(r.dir / name).relative_to(out)})" for v, r in shown) + " |", ""]
    return lines
