"""A study's numbers, read only from the files its runs saved (so `--report-only` is the same code).

`summary.csv` is long form, one row per number: `variant, seed, metric, stage, layer, value` (`stage`:
stage index for per-stage metrics; `layer`: the 1-based encoder layer the number reads, i.e. the
stage's tap layer (0: the input, for the pixel floor), or the layer of NMI / attention distance; both
empty for run-level numbers). Which split a number comes from is in its metric's name
(`isolocal.study.schema.METRICS`). A head's logs (`log_<key>_stage` in metrics.jsonl) are the per-stage
metrics `log_<key>`, read from the last logged step.
`pandas.read_csv` reads it as is.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from isolocal.study.job import ANALYSIS, FINETUNE, PRETRAIN, PROBES, RESULT, RUN_SPEC, missing_files, read_json
from isolocal.study.schema import Run
from isolocal.study.stats import PairedDifference, paired_difference

COLUMNS = ["variant", "seed", "metric", "stage", "layer", "value"]
HEAD_LOG_COLUMN = re.compile(r"(log_[A-Za-z0-9_]+)_stage")  # a step record's `log_<key>_stage` (train.logs)


def read_metrics(run_dir: Path) -> pd.DataFrame:
    path = run_dir / "metrics.jsonl"
    return pd.read_json(path, lines=True) if path.exists() and path.stat().st_size else pd.DataFrame()


def final_losses(metrics: pd.DataFrame) -> pd.Series:
    """The record a run's pre-training losses are read from, its last step or epoch record: the last
    epoch's mean losses (`kind` "epoch") when the run ended with an epoch, else the last logged step's
    ("step": `train.max_steps` stopped it mid-epoch; the trainer always logs the final step)."""
    return metrics[metrics["kind"].isin(["step", "epoch"])].iloc[-1]


def head_logs(steps: pd.DataFrame) -> dict[str, dict[int, float]]:
    """The heads' logs of a run's last logged step, {`log_<key>`: {stage: value}} (stages without the key
    left out)."""
    if steps.empty:
        return {}
    last = steps.iloc[-1]
    logs = {}
    for column in steps.columns:
        match = HEAD_LOG_COLUMN.fullmatch(column)
        if match and isinstance(last[column], list):
            logs[match.group(1)] = {k: v for k, v in enumerate(last[column]) if v is not None and not np.isnan(v)}
    return logs


def run_status(run: Run) -> dict:
    """result.json of a run, a "missing" record when it never ran to the end, or an "incomplete" one when
    it says "ok" but files its numbers come from are gone."""
    path = run.dir / RESULT
    if not path.exists():
        return {"status": "missing", "error": "not run yet"}
    result = read_json(path)
    if result.get("status") == "ok":
        spec = run.dir / RUN_SPEC
        missing = missing_files(run.dir, read_json(spec)) if spec.exists() else [RUN_SPEC]
        if missing:
            return {**result, "status": "incomplete",
                    "error": f"result.json says ok but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                             f"missing; run `isolocal compare` again to redo that phase"}
    return result


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
        last = final_losses(metrics)
        for k, loss in enumerate(last["loss_stage"]):
            add("loss", loss, k, taps[k] + 1)
        add("loss_total", last["loss"])
        for metric, per_stage in head_logs(steps).items():
            for k, value in per_stage.items():
                add(metric, value, k, taps[k] + 1)
    if (run.dir / PROBES).exists():
        probes = read_json(run.dir / PROBES)
        results = probes["results"]
        for mode, stage in probes["selected"].items():  # knn / linear: the stage chosen on validation
            for r in results:
                add(mode, r[f"{mode}_top1"], r["stage"], r["tap"] + 1)
                add(f"{mode}_val", r[f"{mode}_val"], r["stage"], r["tap"] + 1)
            add(f"{mode}_sel", results[stage][f"{mode}_top1"])
            add(f"{mode}_sel_stage", stage)
            add(f"{mode}_top", results[-1][f"{mode}_top1"])
        for r in results:  # only stages with a classify head have one
            if "head_top1" in r:
                add("head", r["head_top1"], r["stage"], r["tap"] + 1)
                add("head_val", r["head_val"], r["stage"], r["tap"] + 1)
        if "head_top1" in results[-1]:
            add("head_top", results[-1]["head_top1"])
    if (run.dir / FINETUNE).exists():
        row = read_json(run.dir / FINETUNE)["results"][0]
        add("finetune", row["finetune_top1"])
        add("finetune_val", row["finetune_val"])
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


def paired_values(a: pd.Series, b: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Two per-seed series (`values`) restricted to the seeds both have, in a's order."""
    seeds = [s for s in a.index if s in b.index]
    return a[seeds].to_numpy(), b[seeds].to_numpy()


def paired(summary: pd.DataFrame, a: str, b: str, metric: str, stage: int | list[int] | None = None,
           layer: int | list[int] | None = None) -> PairedDifference:
    """Paired difference a - b over the seeds both variants have."""
    return paired_difference(*paired_values(values(summary, a, metric, stage, layer),
                                            values(summary, b, metric, stage, layer)))


def online_knn(runs: Sequence[Run]) -> pd.DataFrame:
    """Online k-NN on validation per logged epoch, its best stage: columns variant, seed, epoch, time, knn."""
    frames = []
    for run in runs:
        metrics = read_metrics(run.dir)
        if "kind" not in metrics or not (metrics["kind"] == "knn").any():
            continue
        knn = metrics[metrics["kind"] == "knn"]
        frames.append(pd.DataFrame({"variant": run.variant, "seed": run.seed, "epoch": knn["epoch"].to_numpy(),
                                    "time": knn["time"].to_numpy(),
                                    "knn": knn.filter(like="knn_val_top1_stage").max(axis=1).to_numpy()}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["variant", "seed", "epoch", "time", "knn"])
