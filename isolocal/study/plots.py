"""The report's figures: per-stage loss curves, metrics against depth and online k-NN against epochs and
wall-clock, means over seeds with 95% t-interval bands."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from isolocal.study.job import PRETRAIN, RUN_SPEC, read_json
from isolocal.study.schema import Run, Study
from isolocal.study.stats import mean_ci
from isolocal.study.summary import read_metrics
from isolocal.study.tables import metric_format


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
    ax.set_ylabel(metric_format(metric)[1])
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
