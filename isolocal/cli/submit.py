"""`isolocal submit -c run.toml | --study study.toml [Slurm options]`: a run or a study as Slurm jobs.

Everything is checked here, before anything is written or submitted (the config, the launch's shape,
the run directory, a study's runs); then the batch script (`isolocal.cluster.slurm`) is written beside
the run (`<out_dir>/slurm/`) and submitted with `sbatch`, or only written with `--dry-run`.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from isolocal.cli.options import add_import_option
from isolocal.config.load import load_run_config


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("submit", help="submit a pre-training run or a study to Slurm (requeued on preemption)",
                              description=__doc__.splitlines()[0])
    what = p.add_mutually_exclusive_group()
    what.add_argument("-c", "--config", help="TOML run config: one pre-training run (default: the built-in defaults)")
    what.add_argument("--study", help="study TOML: one job array task per run still to do")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override config (or study) fields")
    p.add_argument("--out", help="run directory (overrides out_dir; runs only)")
    p.add_argument("--resume", action="store_true", help="submit a run whose directory already holds a checkpoint")
    p.add_argument("--pipeline-stages", type=int, default=None, metavar="N", help="DeepSpeed pipeline over N ranks")
    p.add_argument("--only", action="extend", nargs="+", default=[], metavar="VARIANT[:SEED]",
                   help="studies: submit only these runs")
    add_import_option(p)
    p.add_argument("--time", default="2:00:00", help="time limit per job (Slurm's --time)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=0)
    p.add_argument("--tasks-per-node", type=int, default=0, help="ranks per node (default: one per GPU, or 1)")
    p.add_argument("--cpus-per-task", type=int, default=0)
    p.add_argument("--partition", default="")
    p.add_argument("--signal-before", type=int, default=120, metavar="S",
                   help="seconds before the time limit at which every rank is told to save and requeue")
    p.add_argument("--max-requeues", type=int, default=3, help="starts after the first before a job gives up")
    p.add_argument("--array-parallel", type=int, default=0, help="studies: at most this many runs at once")
    p.add_argument("--dry-run", action="store_true", help="write the batch script and print it; submit nothing")
    p.set_defaults(func=submit)


def submit(args: argparse.Namespace) -> int:
    from isolocal.cluster.slurm import SlurmJob  # deferred: --help runs without torch

    job = SlurmJob(time=args.time, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                   tasks_per_node=args.tasks_per_node, cpus_per_task=args.cpus_per_task, partition=args.partition,
                   signal_before_s=args.signal_before, max_requeues=args.max_requeues,
                   array_parallel=args.array_parallel)
    if args.study:
        script, what = _study(args, job)
    else:
        script, what = _run(args, job)
    if args.dry_run:
        print(script.read_text(), end="")
        print(f"wrote {script} (not submitted: --dry-run)")
        return 0
    from isolocal.cluster.slurm import sbatch  # deferred: --help runs without torch

    print(f"submitted job {sbatch(script)}: {what}; script {script}")
    return 0


def _run(args: argparse.Namespace, job) -> tuple[Path, str]:
    from isolocal.cluster.runs import write_run_job  # deferred: --help runs without torch

    if args.only:
        raise ValueError("--only selects a study's runs; use it with --study")
    overrides = args.overrides + ([f"pipeline.stages={args.pipeline_stages}"] if args.pipeline_stages is not None else [])
    cfg = load_run_config(args.config, overrides, args.imports)
    if args.out:
        cfg.out_dir = args.out
    return write_run_job(cfg, job, args.resume)


def _study(args: argparse.Namespace, job) -> tuple[Path, str]:
    from isolocal.cluster.runs import write_study_job  # deferred: --help runs without torch
    from isolocal.study.schema import load_study, select_runs  # deferred: --help runs without torch

    for flag, given in (("--out", args.out), ("--resume", args.resume), ("--pipeline-stages", args.pipeline_stages)):
        if given:
            raise ValueError(f"{flag} applies to one run (-c), not to a study; set study.out_dir with --set instead")
    study = load_study(args.study, args.overrides, args.imports)
    return write_study_job(study, select_runs(study, args.only), job, time.strftime("%Y%m%d-%H%M%S"))
