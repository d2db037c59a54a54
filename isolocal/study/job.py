"""One run of a study, in its own process: pre-train, evaluate, analyse; `python -m isolocal.study.job <run dir>`.

The run directory's `run.json` (written by the study runner) holds everything the run needs. Each
phase leaves its own file, written atomically, and a re-started run skips the phases whose file
exists and resumes pre-training from `last.pt`:

- `pretrain.json`: the trainer's summary (next to its `metrics.jsonl`, `config.toml`, checkpoints);
- `probes.json`: k-NN and per-stage linear probes (`isolocal eval knn linear`'s output);
- `finetune.json`: fine-tuning of the whole encoder (`isolocal eval finetune`'s output);
- `analysis.csv`: per-layer NMI and attention distance; then the run's figures (no rows and no figures
  for a family without attention, e.g. a ResNet);
- `result.json`: status, headline numbers and figure names, or the error of a failed run.

`check_run` finds, before a study starts its first run, what would make a run fail after its start
and needs no training (data, step count, evaluation subsets and k, analysis images);
`missing_files` lists the phase files a run reported as finished should hold but does not.

Controls (`pretrain = false`) skip pre-training and evaluate the encoder at its seeded init, which
is the initialisation the pre-trained variants of the same seed start from; the control named
`pixels` evaluates the raw pixels instead (k-NN and linear probes only).

This module is the only one of the study package that imports the training, evaluation and analysis code.
"""
from __future__ import annotations

import json
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from analysis.capture import capture_attention, encoder_depth, is_windowed, token_layout
from analysis.figures import plot_attention_maps
from analysis.loading import ImageBatch, check_images, input_shape, load_images
from analysis.measure import measure_attention
from analysis.reconstruction_figure import write_reconstruction
from isolocal.config import ConfigError, RunConfig, from_dict
from isolocal.config.imports import import_modules
from isolocal.errors import RunInterrupted
from isolocal.eval.protocols import check_evaluation, evaluate
from isolocal.io.checkpoint import LAST, run_state
from isolocal.io.load import PIXELS, RANDOM, load_model
from isolocal.io.paths import atomic_write_text as write_text
from isolocal.models.encoder import FAMILIES
from isolocal.train import train
from isolocal.train.loop import build_train_dataset, step_counts

RUN_SPEC = "run.json"
PRETRAIN = "pretrain.json"
PROBES = "probes.json"
FINETUNE = "finetune.json"
ANALYSIS = "analysis.csv"
RESULT = "result.json"
LOG = "run.log"


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def run_config(spec: dict) -> RunConfig:
    """The run's config, its `imports` imported (heads of one's own): this process builds its model."""
    cfg = from_dict(RunConfig, spec["config"])
    import_modules(cfg.imports)
    return cfg


_IMAGES: dict[str, int] = {}  # pre-training set size by (data, image) config: the runs of a study share it


def step_plan(spec: dict) -> tuple[int, int]:
    """(steps per epoch, steps in all) of a run's pre-training, from its config (single process, as studies run)."""
    cfg = run_config(spec)
    key = json.dumps([spec["config"]["data"], cfg.model.img_size, cfg.model.in_chans], sort_keys=True)
    if key not in _IMAGES:
        _IMAGES[key] = len(build_train_dataset(cfg))
    t = cfg.train
    return step_counts(t, _IMAGES[key], 1, t.batch_size // t.accum_steps, t.accum_steps)


def run_evals(spec: dict) -> list[str]:
    """The study's evaluations that apply to this run: the pixel floor has no heads and nothing to
    fine-tune (its k-NN and linear probes only), and `head` scores only a model with a classify head."""
    objective = spec["config"]["model"]["objective"]
    classifies = "classify" in (objective if isinstance(objective, list) else [objective])
    return [m for m in spec["evals"]
            if not (spec["variant"] == PIXELS and m in ("head", "finetune")) and not (m == "head" and not classifies)]


def _probe_modes(spec: dict) -> list[list[str]]:
    """The `evaluate` calls of a run: the feature protocols together, fine-tuning alone."""
    evals = run_evals(spec)
    probes = [m for m in evals if m != "finetune"]
    return ([probes] if probes else []) + ([["finetune"]] if "finetune" in evals else [])


_CHECKED: set[str] = set()  # checks passed, by everything they read: the runs of a study share most


def _once(key: object, check: Callable[[], object]) -> None:
    text = json.dumps(key, sort_keys=True)
    if text not in _CHECKED:
        check()
        _CHECKED.add(text)


def check_run(spec: dict) -> None:
    """Raise a ConfigError naming the run for what would fail it after its start and can be found without
    training: its training data and step count, its evaluations (`eval.train_subset` / `test_subset`,
    `eval.knn_k` against the evaluation set, pooling, optimizer) and its analysis images."""
    cfg = run_config(spec)
    data = {k: v for k, v in spec["config"].items() if k not in ("model", "out_dir")}
    m = cfg.model
    try:
        if spec["pretrain"]:
            step_plan(spec)
        for modes in _probe_modes(spec):
            _once([modes, data, m.arch, m.img_size, m.in_chans], lambda modes=modes: check_evaluation(modes, cfg))
        if FAMILIES[m.arch].has_attention:
            count = check_images(spec["images"], m.in_chans)
            if not 0 <= spec["attention_image"] < count:
                raise ConfigError(f"study.attention_image = {spec['attention_image']} is not an index of the "
                                  f"{count} images of study.images ({spec['images']!r})")
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(f"run {spec['variant']} seed {spec['seed']}: {err}") from None


def missing_files(run_dir: Path, spec: dict) -> list[str]:
    """The phase files a finished run of `spec` holds and `run_dir` lacks (deleted or never written)."""
    wanted = [PRETRAIN, "metrics.jsonl"] if spec["pretrain"] else []
    wanted += [FINETUNE if modes == ["finetune"] else PROBES for modes in _probe_modes(spec)] + [ANALYSIS]
    return [name for name in wanted if not (run_dir / name).exists()]


def _stamp_knn_steps(metrics: Path, steps_per_epoch: int) -> None:
    """Give online k-NN records the step their epoch ended on. The trainer's resume trims
    metrics.jsonl by each record's "step" and k-NN records carry only their epoch, so without it a
    run with `train.knn_every_epochs` could not resume."""
    if not metrics.exists():
        return
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    for rec in records:
        if rec["kind"] == "knn" and "step" not in rec:
            rec["step"] = rec["epoch"] * steps_per_epoch - 1
    write_text(metrics, "".join(json.dumps(rec) + "\n" for rec in records))


def pretrain(spec: dict, cfg: RunConfig, run_dir: Path) -> dict:
    """Train (resuming from last.pt when a previous attempt left one); the summary gains the step it resumed
    from and the threads it trained with (on a CPU the thread count changes the last bits of a sum, so a
    rerun matches a run bit for bit only with the same count)."""
    resumed = 0
    if (run_dir / LAST).exists():
        resumed = int(run_state(run_dir / LAST)["step"])
        print(f"resuming pre-training from {run_dir / LAST} (step {resumed})", flush=True)
        _stamp_knn_steps(run_dir / "metrics.jsonl", step_plan(spec)[0])
    summary = train(cfg, resume=(run_dir / LAST).exists())
    return {**summary, "resumed_from_step": resumed, "threads": torch.get_num_threads()}


def encoder_source(spec: dict, run_dir: Path) -> str:
    """What the evaluation loads: the run's last checkpoint, 'pixels' for the pixel floor, or 'random'
    for any other control."""
    if spec["pretrain"]:
        return str(run_dir / LAST)
    return PIXELS if spec["variant"] == PIXELS else RANDOM


def evaluate_run(spec: dict, cfg: RunConfig, ckpt: str, run_dir: Path) -> None:
    """k-NN / linear probes on features extracted once, then fine-tuning: each skipped when saved."""
    for modes in _probe_modes(spec):
        path = run_dir / (FINETUNE if modes == ["finetune"] else PROBES)
        if not path.exists():
            write_json(path, evaluate(modes, cfg, ckpt, progress=False))


def analyse(spec: dict, model: nn.Module, run_dir: Path) -> list[str]:
    """Per-layer NMI / attention distance into analysis.csv; returns the run's figures (file names)."""
    if not model.family.has_attention:  # nothing to measure: the phase's file, without rows
        write_text(run_dir / ANALYSIS, "layer,nmi,attention_distance\n")
        return []
    batch = load_images(spec["images"], *input_shape(model))
    table = measure_attention(model, batch.images)
    table[["layer", "nmi", "attention_distance"]].to_csv(run_dir / ANALYSIS, index=False)
    return run_figures(spec, model, batch, run_dir)


def run_figures(spec: dict, model: nn.Module, batch: ImageBatch, run_dir: Path) -> list[str]:
    """The per-run figures the report shows side by side (same image for every run). Add a figure
    here and the report gains a row of it; returns file names relative to the run directory."""
    figures: list[Path] = []
    i = spec["attention_image"]
    if not is_windowed(model):
        attn = capture_attention(model, batch.images)
        layout = token_layout(model, tuple(batch.images.shape[-2:]))
        depth = encoder_depth(model)
        layers = sorted({min(2, depth), min(4, depth), max(depth - 2, 1), depth})  # the same for every variant
        figures += plot_attention_maps(batch.images[i], [a[i:i + 1] for a in attn], layers,
                                       [tuple(q) for q in spec["query"]], layout.grid, layout.patch[0],
                                       run_dir / "attention_maps.png", layout.num_prefix_tokens, batch.mean, batch.std)
    # What each stage reconstructs, on the same image and mask (seed 0) for every run of the study
    # (runs with a mim head: classify / contrastive heads reconstruct nothing).
    if not hasattr(model, "plan") or model.plan.target_stages:
        one = ImageBatch(batch.images[i:i + 1], batch.names[i:i + 1], batch.mean, batch.std)
        figures += [f for f in write_reconstruction(model, one, run_dir, "run", mask_seed=0) if f.suffix == ".png"]
    return [f.name for f in figures]


def headline(run_dir: Path) -> dict[str, float]:
    """The numbers the console prints when the run ends: final loss, the validation-selected stage's test
    k-NN / linear, the top classify head, fine-tune (all test top-1)."""
    out: dict[str, float] = {}
    if (run_dir / PRETRAIN).exists():
        out["loss"] = read_json(run_dir / PRETRAIN)["final_loss"]
    if (run_dir / PROBES).exists():
        probes = read_json(run_dir / PROBES)
        rows = probes["results"]
        for mode, stage in probes["selected"].items():
            out[f"{mode}_sel"] = rows[stage][f"{mode}_top1"]
        if "head_top1" in rows[-1]:
            out["head_top"] = rows[-1]["head_top1"]
    if (run_dir / FINETUNE).exists():
        out["finetune"] = read_json(run_dir / FINETUNE)["results"][0]["finetune_top1"]
    return out


def run_job(run_dir: Path) -> dict:
    """All phases of one run; returns what goes into result.json."""
    start = time.perf_counter()
    spec = read_json(run_dir / RUN_SPEC)
    cfg = run_config(spec)
    if spec["pretrain"] and not (run_dir / PRETRAIN).exists():
        write_json(run_dir / PRETRAIN, pretrain(spec, cfg, run_dir))
    ckpt = encoder_source(spec, run_dir)
    evaluate_run(spec, cfg, ckpt, run_dir)
    figures = analyse(spec, load_model(ckpt, cfg), run_dir)
    return {"variant": spec["variant"], "seed": spec["seed"], "status": "ok", "headline": headline(run_dir),
            "figures": figures, "job_s": time.perf_counter() - start}


def _interrupt(signum: int, frame: object) -> None:
    raise RunInterrupted(f"interrupted by {signal.Signals(signum).name}; the finished phases are kept and the "
                         "next start of this run goes on from them")


def main(run_dir: str) -> int:
    """Run one job and write result.json, failure included (the other runs of the study go on); a run
    interrupted by a signal after saving its state writes none and exits 130."""
    path = Path(run_dir)
    for sig in (signal.SIGTERM, signal.SIGUSR1):  # outside pre-training (which saves first) stop at once
        signal.signal(sig, _interrupt)
    try:
        result = run_job(path)
    except RunInterrupted as err:  # state saved: not a result, the next start resumes (a requeued Slurm task)
        print(f"isolocal: {err}", file=sys.stderr)
        return 130
    except BaseException as err:  # recorded in the report
        spec = read_json(path / RUN_SPEC) if (path / RUN_SPEC).exists() else {}
        result = {"variant": spec.get("variant"), "seed": spec.get("seed"), "status": "failed",
                  "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
        traceback.print_exc()
    write_json(path / RESULT, result)
    return 0 if result["status"] == "ok" else 1


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m isolocal.study.job <run dir holding run.json>")
    sys.exit(main(sys.argv[1]))
