"""What `isolocal submit` writes before it submits: a run's resolved config and batch script, or a
study's run specs, run list and job-array script; every check first, so a bad submission writes nothing.
"""
from __future__ import annotations

from pathlib import Path

from isolocal.cluster.slurm import SlurmJob, pretrain_script, study_script
from isolocal.config import ConfigError, RunConfig, to_dict
from isolocal.config.toml import dumps_toml
from isolocal.io.checkpoint import LAST, PIPELINE_DIR
from isolocal.io.paths import atomic_write_text, check_writable_dir
from isolocal.study.runner import open_run, runs_to_do
from isolocal.study.schema import Run, Study
from isolocal.train.launch import check_pipeline
from isolocal.train.loop import micro_batch_size

SLURM_DIR = "slurm"


def check_run_launch(cfg: RunConfig, ranks: int) -> str:
    """What `ranks` processes of `cfg` are (a pipeline or data parallel), or a ConfigError for a launch
    that cannot split the batch (checked here rather than minutes into a queued job)."""
    if cfg.pipeline.stages > 0:
        stages, replicas = check_pipeline(cfg, ranks)
        return f"a {stages}-stage pipeline x {replicas} replica(s)"
    micro_batch_size(cfg.train, cfg.train.accum_steps, ranks, ("train.accum_steps", "ranks (nodes x tasks)"))
    return f"{ranks} data-parallel rank(s)" if ranks > 1 else "one process"


def write_run_job(cfg: RunConfig, job: SlurmJob, resume: bool) -> tuple[Path, str]:
    """(the batch script, what it runs) for one pre-training run, written to `<out_dir>/slurm/`."""
    out = Path(cfg.out_dir).resolve()
    shape = check_run_launch(cfg, job.nodes * job.tasks)
    check_writable_dir(out, "run directory (out_dir)")
    held = (out / LAST).exists() or (out / PIPELINE_DIR / "latest").exists()
    if held and not resume:
        raise ConfigError(f"{out} already holds a run; pass --resume to continue it or choose another out_dir")
    if resume and not held:
        raise ConfigError(f"--resume: no checkpoint in {out} to resume")
    cfg.out_dir = str(out)
    folder = out / SLURM_DIR
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "config.toml"
    atomic_write_text(config, dumps_toml(to_dict(cfg)))
    script = folder / "pretrain.sbatch"
    atomic_write_text(script, pretrain_script(config, out, job))
    return script, f"{cfg.model.boundary} pre-training as {shape}, log in {out}/slurm-<job id>.out"


def write_study_job(study: Study, runs: list[Run], job: SlurmJob, stamp: str) -> tuple[Path, str]:
    """(the batch script, what it runs) for a study's unfinished runs: one array task per run."""
    check_writable_dir(study.root, "study.out_dir")
    todo = runs_to_do(study, runs)
    if not todo:
        raise ConfigError(f"every selected run of study {study.name!r} is finished; nothing to submit "
                          "(isolocal compare --report-only builds the report)")
    folder = study.root.resolve() / SLURM_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for run in todo:
        open_run(study, run)
    run_list = folder / f"runs-{stamp}.txt"
    atomic_write_text(run_list, "".join(f"{run.dir.resolve()}\n" for run in todo))
    script = folder / f"study-{stamp}.sbatch"
    atomic_write_text(script, study_script(study.name, run_list, len(todo), folder, job))
    return script, (f"{len(todo)} run(s) of study {study.name} as array tasks 0-{len(todo) - 1} (logs in {folder}); "
                    "when they have ended, `isolocal compare -c <study file> --report-only` builds the report")
