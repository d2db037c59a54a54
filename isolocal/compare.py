"""`isolocal compare -c study.toml`: paired variants, same seeds, data order and masks; one report.

A study file has a `[study]` table (output directory, analysis images, query points, how many
variants run at once), a `[base]` table (a run config shared by every variant) and one
`[variants.<name>]` table per variant holding only what differs (boundary, taps, preset, target).
Every variant runs in its own process: pre-training, then k-NN and per-stage linear probes, then
attention analysis; it writes its results into `<out>/runs/<name>/`. A variant that crashes is
recorded as failed (with its error) without stopping the others. The report (`report.md`, figures,
`summary.csv`) is then built only from those saved files, which is what `--report-only` re-runs.
"""
from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
import tomllib
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from isolocal.config import ConfigError, RunConfig, apply_overrides, from_dict, load_run_config

VARIANT_LOG = "variant.log"
RESULT = "result.json"
EVAL = "eval.json"


@dataclass
class Study:
    name: str
    out_dir: str
    variants: dict[str, dict]  # name -> the variant's full run-config dict (base merged with its table)
    images: str = "fmnist:0,1,2,3,4,5,6,7"
    query: list[list[int]] = field(default_factory=lambda: [[4, 4], [1, 6]])
    attention_image: int = 0
    parallel: int = 1
    evals: list[str] = field(default_factory=lambda: ["knn", "linear"])

    @property
    def root(self) -> Path:
        return Path(self.out_dir)


def _merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_study(path: str | Path, overrides: list[str] | None = None) -> Study:
    """Read and validate a study file; every variant's config is resolved here, before any work."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study file {path} does not exist")
    data = apply_overrides(tomllib.loads(path.read_text()), overrides or [])
    unknown = sorted(set(data) - {"study", "base", "variants"})
    if unknown:
        raise ConfigError(f"unknown study table {unknown[0]}; valid tables: study, base, variants")
    options = dict(data.get("study", {}))
    variants = data.get("variants", {})
    if not variants:
        raise ConfigError(f"study file {path} defines no [variants.<name>] tables")
    name = options.pop("name", path.stem)
    out_dir = Path(options.pop("out_dir", f"reports/{name}"))
    merged = {v: _merge(data.get("base", {}), table) for v, table in variants.items()}
    study = from_dict(Study, {"name": name, "out_dir": str(out_dir), "variants": merged, **options}, prefix="study.")
    bad = [e for e in study.evals if e not in ("knn", "linear")]
    if bad:
        raise ConfigError(f"study.evals may hold knn and linear, got {bad}")
    if study.parallel < 1:
        raise ConfigError(f"study.parallel must be >= 1, got {study.parallel}")
    for variant in study.variants:
        resolve_variant(study, variant)  # raises on a bad variant before anything runs
    return study


def resolve_variant(study: Study, name: str) -> RunConfig:
    """A variant's RunConfig, its out_dir inside the study."""
    data = copy.deepcopy(study.variants[name])
    data["out_dir"] = str(study.root / "runs" / name)
    cfg = from_dict(RunConfig, {k: v for k, v in data.items() if k != "model"})
    from isolocal.config import resolve_model_config, validate_run

    try:
        cfg.model = resolve_model_config(cfg.preset, data.get("model", {}))
        from isolocal.models.mim import LocalMIM  # geometry is validated without allocating weights
        LocalMIM.check_config(cfg.model)
    except ValueError as err:
        raise ConfigError(f"variant {name}: {err}") from None
    validate_run(cfg)
    return cfg


# ---------------------------------------------------------------------------------------------- variant job


def run_variant(study: Study, name: str) -> dict:
    """Pre-train, evaluate and analyse one variant in this process; returns what it writes to result.json."""
    from isolocal.config import to_dict
    from isolocal.eval.cli import evaluate
    from isolocal.train import train
    from isolocal.train.checkpoint import LAST

    cfg = resolve_variant(study, name)
    run_dir = Path(cfg.out_dir)
    start = time.perf_counter()
    summary = train(cfg, resume=(run_dir / LAST).exists())
    ckpt = str(run_dir / LAST)
    result: dict[str, Any] = {"name": name, "status": "ok", "train": summary, "config": to_dict(cfg),
                              "boundary": cfg.model.boundary, "stages": len(cfg.model.taps)}
    out = evaluate(study.evals, cfg, ckpt, progress=False)
    (run_dir / EVAL).write_text(json.dumps(out, indent=2) + "\n")
    for mode in study.evals:
        result[mode] = [row[f"{mode}_top1"] for row in out["results"]]
    result["analysis"] = analyse_variant(study, ckpt, run_dir)
    result["wall_time"] = time.perf_counter() - start
    return result


def analyse_variant(study: Study, ckpt: str, run_dir: Path) -> dict:
    """Per-layer NMI / attention distance (analysis.csv) and attention maps of fixed query points."""
    import torch

    from analysis.capture import attention_layouts, capture_attention, is_windowed
    from analysis.figures import plot_attention_maps
    from analysis.loading import encoder_depth, load_for_analysis, load_images
    from analysis.metrics import layout_table

    model, layout = load_for_analysis(ckpt)
    batch = load_images(study.images, model.cfg.img_size, model.cfg.in_chans)
    with torch.no_grad():
        attn = capture_attention(model, batch.images)
    table = layout_table(attn, attention_layouts(model, tuple(batch.images.shape[-2:]), encoder_depth(model)))
    table[["layer", "nmi", "attention_distance"]].to_csv(run_dir / "analysis.csv", index=False)
    figures = []
    if not is_windowed(model):
        layers = [t.index + 1 for t in model.taps] if len(model.taps) > 1 else [1, 2, model.cfg.depth - 1, model.cfg.depth]
        figures = plot_attention_maps(batch.images[study.attention_image], [a[study.attention_image:study.attention_image + 1] for a in attn],
                                      sorted(set(layers)), [tuple(q) for q in study.query], layout.grid, layout.patch[0],
                                      run_dir / "attention_maps.png", layout.num_prefix_tokens, batch.mean, batch.std)
    return {"csv": "analysis.csv", "figures": [Path(f).name for f in figures]}


def _variant_main(study_path: str, overrides: list[str], name: str) -> int:
    """Entry of a variant's own process: run it and write result.json, failure included."""
    study = load_study(study_path, overrides)
    run_dir = study.root / "runs" / name
    try:
        result = run_variant(study, name)
    except BaseException as err:  # recorded in the report; the other variants go on
        result = {"name": name, "status": "failed", "error": f"{type(err).__name__}: {err}",
                  "traceback": traceback.format_exc()}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RESULT).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["status"] == "ok" else 1


def _launch(study_path: str, overrides: list[str], study: Study, name: str) -> None:
    run_dir = study.root / "runs" / name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RESULT).unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "isolocal.compare", "--variant", name, study_path]
    for item in overrides:
        cmd += ["--set", item]
    with open(run_dir / VARIANT_LOG, "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    if not (run_dir / RESULT).exists():  # the process died without writing its result
        tail = (run_dir / VARIANT_LOG).read_text()[-2000:]
        (run_dir / RESULT).write_text(json.dumps({"name": name, "status": "failed",
                                                  "error": f"process exited with code {proc.returncode}",
                                                  "traceback": tail}, indent=2) + "\n")


def run_study(study_path: str, overrides: list[str], report_only: bool = False) -> Path:
    """Run every variant (unless `report_only`), then build the report; returns report.md's path."""
    from isolocal.report import build_report

    study = load_study(study_path, overrides)
    study.root.mkdir(parents=True, exist_ok=True)
    if not report_only:
        names = list(study.variants)
        with ThreadPoolExecutor(max_workers=study.parallel) as pool:
            for i, _ in enumerate(pool.map(lambda n: _launch(study_path, overrides, study, n), names)):
                print(f"[compare] variant {names[i]} finished", flush=True)
    return build_report(study)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("compare", help="run a paired study (global vs isolated vs top-only) and report")
    p.add_argument("-c", "--config", required=True, help="study TOML (see experiments/quickstart.toml)")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override study fields, e.g. base.train.epochs=3 or study.parallel=2")
    p.add_argument("--report-only", action="store_true", help="rebuild the report from saved runs, no training")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    report = run_study(args.config, args.overrides, args.report_only)
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="run one variant of a study (used by `isolocal compare`)")
    parser.add_argument("--variant", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("study")
    ns = parser.parse_args()
    sys.exit(_variant_main(ns.study, ns.overrides, ns.variant))
