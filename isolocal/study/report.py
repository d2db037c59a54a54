"""A study's report: `summary.csv`, the figures and `report.md`, built only from the files its runs saved.

`report.md` has one table per metric family (losses, k-NN, linear, fine-tune, NMI, attention
distance, cost) with mean +- 95% t-interval half-width over seeds and "–" where a value does not
apply; paired differences to the baseline; claim verdicts; time to accuracy; figures. The numbers
come from `summary` (claims judged by `claims`), the tables from `tables`, the figures from `plots`;
this module writes the text.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from isolocal.heads import StagePlan
from isolocal.io.load import PIXELS
from isolocal.study.job import FINETUNE, LOG, PRETRAIN, PROBES, read_json
from isolocal.study.plots import plot_depth, plot_losses, plot_online_knn
from isolocal.study.schema import HEAD_LOG, Run, Study, resolve_run
from isolocal.study.stats import CONFIDENCE
from isolocal.study.summary import final_losses, online_knn, read_metrics, run_status, summary_frame
from isolocal.study.tables import claim_rows, metric_table, paired_table, time_to_accuracy


def _markdown(table: pd.DataFrame, names: int = 1) -> str:
    """A pipe table: the first `names` columns left-aligned, the numbers right-aligned."""
    align = ("left",) * names + ("right",) * (table.shape[1] - names)
    return table.to_markdown(index=False, colalign=align, disable_numparse=True)


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
    families = [(loss_heading(ok), ["loss", "loss_total"]),
                ("k-NN top-1 % on test (per stage by its tap layer; the stage chosen on validation; the last stage)",
                 ["knn", "knn_sel", "knn_top"]),
                ("k-NN top-1 % on validation (per stage; what selects the stage)", ["knn_val", "knn_sel_stage"]),
                ("Linear probe top-1 % on test (per stage by its tap layer; the stage chosen on validation; the last "
                 "stage)", ["linear", "linear_sel", "linear_top"]),
                ("Linear probe top-1 % on validation (per stage, at each probe's best validation epoch; what selects "
                 "the stage)", ["linear_val", "linear_sel_stage"]),
                ("Classify heads' own top-1 % on test (per stage with one; top = the model's prediction)",
                 ["head", "head_top"]),
                ("Classify heads' own top-1 % on validation", ["head_val"]),
                ("Fine-tuning top-1 % (whole encoder, at its best validation epoch)", ["finetune_val", "finetune"]),
                ("Query/key NMI per encoder layer", ["nmi"]),
                ("Mean attention distance per encoder layer (pixels)", ["attention_distance"]),
                ("Cost of pre-training", ["pretrain_s", "epoch_s", "img_per_s", "peak_mem_mb"])]
    head_logs = [(f"Head log `{metric.removeprefix('log_')}` per stage (by its tap layer; at the last logged "
                  "training step)", [metric]) for metric in sorted(summary["metric"].unique())
                 if HEAD_LOG.fullmatch(metric)]
    families[1:1] = head_logs  # right after the losses
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


def loss_heading(ok: list[Run]) -> str:
    """The loss table's heading, saying what its numbers are: each run's mean over its last epoch, or
    its last logged step's where `train.max_steps` stopped it mid-epoch (`summary.final_losses`)."""
    kinds = {run.label: final_losses(read_metrics(run.dir))["kind"] for run in ok if (run.dir / PRETRAIN).exists()}
    stopped = [label for label, kind in kinds.items() if kind == "step"]
    if not stopped:
        return "Pre-training losses (mean over the last epoch, per stage by its tap layer)"
    if len(stopped) == len(kinds):
        return ("Pre-training losses (the last logged step's: train.max_steps stopped every run mid-epoch; per "
                "stage by its tap layer)")
    return (f"Pre-training losses (mean over the last epoch; the last logged step's for {', '.join(stopped)}, "
            "which train.max_steps stopped mid-epoch; per stage by its tap layer)")


def _preamble(study: Study, runs: list[Run], ok: list[Run], status: dict) -> list[str]:
    seeds = study.seeds
    lines = [f"Variants: {', '.join(study.variants)}; baseline: {study.baseline}; evaluations: "
             f"{', '.join(study.evals)}. Runs with the same seed share the initialisation seed, data order "
             f"and masks; controls ({', '.join(v for v, p in study.pretrain.items() if not p) or 'none'}) are "
             f"evaluated at that initialisation without pre-training (`{PIXELS}`: the raw pixels, no encoder).", ""]
    lines += _heads_section(study)
    if seeds is None or len(seeds) < 2:
        lines += ["**One seed per variant: values below have no confidence intervals and claims stay "
                  "undecided.** Set `study.seeds` (e.g. `[0, 1, 2]`) to measure them.", ""]
    else:
        lines += [f"Seeds {', '.join(map(str, seeds))}. Cells are mean ± half-width of the {CONFIDENCE:.0%} "
                  "t-interval over seeds (`scipy.stats.t.interval`); `(n=k)` marks cells with fewer finished "
                  "seeds; – means the value does not apply.", ""]
    lines += _splits_lines(ok)
    lines += [f"{len(ok)} of {len(runs)} runs finished. Every number is read from `summary.csv` "
              "(long form: variant, seed, metric, stage, layer, value), built from each run's files under "
              "`runs/<variant>/" + ("seed<k>/" if seeds is not None else "") + "`.", ""]
    for run in runs:
        st = status[run]
        if st["status"] in ("failed", "incomplete"):
            lines += [f"**{run.label} {st['status']}**: {st['error']} (see `{run.dir.relative_to(study.root)}/{LOG}`)",
                      ""]
    missing = [run.label for run in runs if status[run]["status"] == "missing"]
    if missing:
        lines += [f"Not run yet: {', '.join(missing)}.", ""]
    return lines


def _splits_lines(ok: list[Run]) -> list[str]:
    """Which images every accuracy comes from, read from the first finished run's evaluation."""
    for run in ok:
        for name in (PROBES, FINETUNE):
            if (run.dir / name).exists():
                r = read_json(run.dir / name)
                e = r["eval"]
                return [f"Splits: probes and fine-tuning train on {r['train_images']:,} labelled training images; "
                        f"{r['val_images']:,} more ({e['val_fraction']:.0%} of them, drawn with seed {e['val_seed']}) "
                        "are the validation split every selection reads (stage, probe and fine-tune epoch); the "
                        f"{r['test_images']:,} test images are read once per run, after selection. `val` in a "
                        "heading means validation, everything else is test.", ""]
    return []


def heads_per_stage(study: Study, variant: str) -> str:
    """Which head (`model.objective`) trained which stages of a variant, and across which boundaries."""
    if variant == PIXELS:
        return "no encoder: the probes read the raw, normalized pixels"
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
            "Per seed, variant minus baseline at the same seed; mean, its 95% t-interval and the two-sided "
            "paired t-test p-value of a zero difference (`scipy.stats.ttest_rel`).", "", _markdown(table, names=2), ""]


def _claims_section(study: Study, summary: pd.DataFrame) -> list[str]:
    if not study.claims:
        return []
    return ["## Claims", "",
            "- **Rule.** A claim's direction and margin set its threshold t: a − b > −margin "
            "(non-inferior: a at most margin worse than b) or a − b > margin (superior), with a − b the "
            "mean of the per-seed differences. It **holds** when the 95% t-interval of a − b lies above t, "
            "**fails** when it lies below, and is **undecided** otherwise: the one-sided t-test of the "
            "claim's null H0: a − b ≤ t at α = 0.025 (and of a − b ≥ t for fails). The one-sided p is "
            "that test's p-value against H0.",
            "- **Holm.** The Holm verdict applies Holm's step-down correction (Holm 1979) at the same α "
            "across the study's informative claims, once to their nulls and once to the reverse nulls, so "
            "the chance of even one wrong \"holds\" (or one wrong \"fails\") among them is at most 2.5%.",
            "- **Floors.** A claim on an accuracy says something only when both variants beat both floors "
            "(the encoder at random init; probes on raw pixels): per seed, each side's number minus the "
            "floor's (k-NN against its k-NN, trained classifiers against its linear probe, at its "
            "validation-selected stage) must have a 95% interval above 0. Otherwise the claim is "
            "**uninformative** and left out of the Holm family.",
            "- **Power.** The last column is the number of seeds with which the test would decide the "
            "claim with 80% probability if the observed mean and spread of a − b were the truth "
            "(noncentral t); `isolocal compare --plan` prints it alone.", "",
            _markdown(claim_rows(study, summary), names=4), ""]


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
