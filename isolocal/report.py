"""A study's report, built only from what its variants saved (so `--report-only` is the same code).

`summary.csv` holds one row per variant with every number in its own column; `report.md` shows the
same numbers as a markdown table with the figures: per-stage loss curves, accuracy vs wall-clock,
NMI and attention distance vs depth, and the attention maps side by side.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

if TYPE_CHECKING:
    from isolocal.compare import Study

NMI_LAYERS = (2, 4)


def read_metrics(run_dir: Path) -> pd.DataFrame:
    path = run_dir / "metrics.jsonl"
    return pd.read_json(path, lines=True) if path.exists() and path.stat().st_size else pd.DataFrame()


def variant_row(name: str, run_dir: Path) -> dict[str, Any]:
    """One summary row from a variant's result.json, metrics.jsonl, eval.json and analysis.csv."""
    result_path = run_dir / "result.json"
    result = json.loads(result_path.read_text()) if result_path.exists() else {"status": "missing"}
    row: dict[str, Any] = {"variant": name, "status": result["status"]}
    if result["status"] != "ok":
        row["error"] = result.get("error", "no result.json: the variant never ran")
        return row
    row["boundary"] = json.dumps(result["boundary"]).strip('"')
    metrics = read_metrics(run_dir)
    steps = metrics[metrics["kind"] == "step"]
    last = steps.iloc[-1]
    for k, loss in enumerate(last["loss_stage"]):
        row[f"loss_s{k}"] = loss
    row["loss"] = last["loss"]
    evals = json.loads((run_dir / "eval.json").read_text())["results"]
    for mode in ("knn", "linear"):
        accs = [r[f"{mode}_top1"] for r in evals if f"{mode}_top1" in r]
        for k, acc in enumerate(accs):
            row[f"{mode}_s{k}"] = acc
        if accs:
            row[f"{mode}_best"] = max(accs)
    analysis = pd.read_csv(run_dir / "analysis.csv").set_index("layer")
    for layer in NMI_LAYERS:
        row[f"nmi_l{layer}"] = analysis.loc[layer, "nmi"] if layer in analysis.index else float("nan")
    row["img_per_s"] = steps["img_per_s"].median()
    row["peak_mem_mb"] = steps["peak_mem_mb"].max()
    row["pretrain_s"] = result["train"]["time"]
    return row


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def plot_loss_curves(runs: dict[str, pd.DataFrame], path: Path) -> Path:
    """One panel per stage (MAE-style top-only runs share the last panel), one line per variant."""
    stages = max(len(m["loss_stage"].iloc[0]) for m in runs.values())
    fig = Figure(figsize=(3.2 * stages, 2.8))
    axes = fig.subplots(1, stages, squeeze=False)[0]
    for name, metrics in runs.items():
        steps = metrics[metrics["kind"] == "step"]
        per_stage = pd.DataFrame(steps["loss_stage"].tolist(), index=steps["step"])
        offset = stages - per_stage.shape[1]
        for k in per_stage.columns:
            axes[offset + k].plot(per_stage.index, per_stage[k], label=name)
    for k, ax in enumerate(axes):
        ax.set_title(f"stage {k} loss")
        ax.set_xlabel("step")
    axes[-1].legend(fontsize=7)  # the last panel has every variant (top-only runs live there)
    return _save(fig, path)


def plot_accuracy_vs_time(rows: list[dict], runs: dict[str, pd.DataFrame], path: Path) -> Path:
    """Best-stage accuracy against pre-training wall-clock: online k-NN curves (when the runs logged
    `knn` records) and the final k-NN / linear-probe points, one colour per variant."""
    fig = Figure(figsize=(4.8, 3.4))
    ax = fig.subplots()
    for i, row in enumerate(rows):
        color = f"C{i}"
        metrics = runs[row["variant"]]
        if "kind" in metrics and (metrics["kind"] == "knn").any():
            knn = metrics[metrics["kind"] == "knn"]
            best = knn.filter(like="knn_top1_stage").max(axis=1)
            ax.plot(knn["time"], best, color=color, alpha=0.6, label=f"{row['variant']} (online k-NN)")
        for mode, marker in (("knn", "o"), ("linear", "s")):
            if f"{mode}_best" in row:
                ax.scatter(row["pretrain_s"], row[f"{mode}_best"], color=color, marker=marker,
                           label=f"{row['variant']} ({mode})")
    ax.set_xlabel("pre-training time (s)")
    ax.set_ylabel("best-stage top-1 (%)")
    ax.legend(fontsize=6)
    return _save(fig, path)


def _markdown_table(table: pd.DataFrame) -> str:
    return table.to_markdown(index=False, floatfmt=".4g")


def build_report(study: "Study") -> Path:
    """Write summary.csv, the figures and report.md into the study's directory."""
    from analysis.figures import plot_metric_vs_depth

    out = study.root
    rows, metrics, analyses = [], {}, {}
    for name in study.variants:
        run_dir = out / "runs" / name
        row = variant_row(name, run_dir)
        rows.append(row)
        if row["status"] == "ok":
            metrics[name] = read_metrics(run_dir)
            analyses[name] = pd.read_csv(run_dir / "analysis.csv")
    summary = pd.DataFrame(rows)
    summary.to_csv(out / "summary.csv", index=False)
    figures = []
    if metrics:
        figures.append(plot_loss_curves(metrics, out / "loss_curves.png"))
        figures.append(plot_accuracy_vs_time([r for r in rows if r["status"] == "ok"], metrics, out / "accuracy_vs_time.png"))
        figures += plot_metric_vs_depth(analyses, "nmi", out / "nmi_vs_depth")
        figures += plot_metric_vs_depth(analyses, "attention_distance", out / "distance_vs_depth")
    lines = [f"# Study: {study.name}", "",
             "Every variant used the same seed, data order and masks; numbers below are read from each run's "
             "`metrics.jsonl` (last logged step), `eval.json` and `analysis.csv` under `runs/<variant>/`.", "",
             "`loss_s<k>`: stage k's local loss; `knn_s<k>` / `linear_s<k>`: top-1 (%) of stage k's features; "
             f"`nmi_l<n>`: query/key NMI at encoder layer n (1-based); `img_per_s`: median pre-training "
             "throughput; `peak_mem_mb`: peak memory the training loop added; `pretrain_s`: pre-training wall-clock.",
             "", _markdown_table(summary), ""]
    failed = summary[summary["status"] != "ok"]
    for _, row in failed.iterrows():
        lines += [f"**{row['variant']} failed**: {row.get('error', '')} (see `runs/{row['variant']}/variant.log`)", ""]
    for fig in figures:
        lines += [f"![{fig.stem}]({fig.name})", ""]
    maps = [(name, out / "runs" / name / "attention_maps.png") for name in analyses]
    maps = [(n, p) for n, p in maps if p.exists()]
    if maps:
        lines += ["## Attention maps (same image and query patches)", "",
                  "| " + " | ".join(n for n, _ in maps) + " |", "|" + "---|" * len(maps),
                  "| " + " | ".join(f"![{n}](runs/{n}/attention_maps.png)" for n, _ in maps) + " |", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report
