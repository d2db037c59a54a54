"""`isolocal pretrain | torchrun | export | info`: run a recipe (on this machine or, under `torchrun`'s
arguments, on several nodes), export its encoder to timm, inspect its stages.

Parsing and printing only: the work is `isolocal.train.train` (or, with `pipeline.stages` > 0, the
DeepSpeed pipeline runner `isolocal.train.pipeline.runner.pretrain_pipeline`, which runs the same
loop), `isolocal.io.export.write_timm_export`, `isolocal.models.stage_cost.stage_report` and
`isolocal.train.pipeline.plan.plan_run`. `pretrain --nproc N` checks the launch, then starts N workers
(`isolocal.train.launch.launch_local`), each running this same command without `--nproc`; `isolocal
torchrun ARGS` is `torchrun ARGS` with signals handled for training (`isolocal.train.launch.launch_torchrun`).
"""
from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from isolocal.cli.options import add_import_option
from isolocal.config.imports import load_imports
from isolocal.config.load import load_run_config

if TYPE_CHECKING:
    from isolocal.config import RunConfig


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", help="TOML run config (default: the built-in defaults)")
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override any config field, e.g. --set train.epochs=3 model.boundary=isolated")
    add_import_option(parser)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("pretrain", help="pre-train a model (global or isolated; torchrun for data parallel)")
    _config_args(p)
    p.add_argument("--out", help="run directory (overrides out_dir)")
    p.add_argument("--resume", action="store_true", help="continue the run in the run directory from its checkpoint")
    p.add_argument("--pipeline-stages", type=int, default=None, metavar="N",
                   help="DeepSpeed pipeline over N ranks (launch with --nproc, torchrun or deepspeed); sets pipeline.stages")
    p.add_argument("--init", default=None,
                   help="start from the weights of this checkpoint or run directory (single-process or pipeline)")
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="start N worker processes on this machine (instead of torchrun --nproc-per-node N): "
                        "pipeline ranks with --pipeline-stages, else data-parallel replicas")
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # appended by the deepspeed launcher
    p.set_defaults(func=pretrain)

    p = subparsers.add_parser(
        "torchrun", add_help=False, usage="isolocal torchrun [torchrun's arguments] -m isolocal.cli pretrain ...",
        help="torchrun (same arguments, e.g. --nnodes, --node-rank, --rdzv-endpoint) that forwards SIGUSR1, "
             "gives workers time to save and exits 130 after a signal")
    p.set_defaults(func=torchrun, passthrough=True)

    p = subparsers.add_parser("export", help="export a checkpoint's encoder as a timm state dict")
    p.add_argument("--ckpt", required=True, help="isolocal checkpoint or run directory (single-process or pipeline)")
    p.add_argument("--out", required=True, help="output .pt; the timm model name and kwargs go to <out>.json")
    add_import_option(p)
    p.set_defaults(func=export)

    p = subparsers.add_parser("info", help="per stage: blocks, parameters, forward FLOPs (and time, --measure)")
    _config_args(p)
    p.add_argument("--measure", action="store_true",
                   help="also time every stage on train.device (minutes for a large model on a CPU); without it the "
                        "report and the pipeline plan come from counted parameters and FLOPs, at once")
    p.add_argument("--repeats", type=int, default=5, help="with --measure: timed calls per stage (median reported)")
    p.add_argument("--tflops", type=float, default=10.0,
                   help="without --measure: the device throughput (TFLOP/s) the pipeline plan assumes")
    p.add_argument("--pipeline-stages", type=int, default=None, metavar="S",
                   help="also predict a pipeline of S ranks: partitions, step time, bubble, speed-up")
    p.add_argument("--micro-batches", type=int, default=None, metavar="M",
                   help="micro-batches per step for --pipeline-stages (default: pipeline.micro_batches)")
    p.add_argument("--micro-batch-size", type=int, default=None, metavar="B",
                   help="images per micro-batch for --pipeline-stages (default: train.batch_size / M)")
    p.add_argument("--bandwidth-gbs", type=float, default=10.0,
                   help="point-to-point bandwidth between ranks for --pipeline-stages, GB/s")
    p.set_defaults(func=info)


def _pretrain(cfg: RunConfig, resume: bool, init: str | None) -> dict:
    """The trainer, or with `pipeline.stages` > 0 the pipeline runner; every rank of a pipeline gets a
    summary, with its `rank`."""
    if resume and init is not None:
        raise ValueError("--resume continues a run from its own checkpoint; --init starts a new run from "
                         "another one's weights: pass one of them")
    from isolocal.train.launch import check_launch  # deferred: --help runs without torch

    if cfg.pipeline.stages > 0:
        check_launch(cfg)  # before deepspeed is imported: a bad launch ends in one line
        # imports deepspeed (and checks its version): only pipeline runs need it; keeps `isolocal --help` fast
        from isolocal.train.pipeline.runner import pretrain_pipeline

        return pretrain_pipeline(cfg, resume=resume, init=init)
    from isolocal.train import train  # deferred: --help runs without torch

    return train(cfg, resume=resume, init=init)


def _launch(args: argparse.Namespace, cfg: RunConfig) -> int:
    """`--nproc N`: the launch checked here, once, then N workers running this command without `--nproc`."""
    if args.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
    if "WORLD_SIZE" in os.environ:
        raise ValueError("--nproc starts the workers itself; run it directly, not under torchrun or deepspeed")
    from isolocal.train.launch import check_pipeline, launch_local  # deferred: --help runs without torch

    if cfg.pipeline.stages > 0:
        check_pipeline(cfg, args.nproc)
    worker = ["isolocal.cli", "pretrain", *(["-c", args.config] if args.config else []),
              *(["--set", *args.overrides] if args.overrides else []), *(["--out", args.out] if args.out else []),
              *(["--pipeline-stages", str(args.pipeline_stages)] if args.pipeline_stages is not None else []),
              *(["--init", args.init] if args.init else []), *(["--resume"] if args.resume else []),
              *(f"--import={spec}" for spec in args.imports)]
    return launch_local(args.nproc, worker)


def pretrain(args: argparse.Namespace) -> int:
    overrides = args.overrides + ([f"pipeline.stages={args.pipeline_stages}"] if args.pipeline_stages is not None else [])
    cfg = load_run_config(args.config, overrides, args.imports)
    if args.out:
        cfg.out_dir = args.out
    if args.nproc is not None:
        return _launch(args, cfg)
    summary = _pretrain(cfg, args.resume, args.init)
    rank_zero = os.environ.get("RANK", "0") == "0"  # one line for the whole launch
    if rank_zero and summary.get("already_finished"):
        print(f"{summary['out_dir']} is already finished: {summary['steps']} steps, {summary['epochs_completed']} "
              f"epochs, final loss {summary['final_loss']:.4f}; nothing to resume (raise train.epochs to go on)")
    elif rank_zero:
        print(f"{summary['mode']} run: {summary['steps']} steps, {summary['epochs_completed']} epochs, "
              f"final loss {summary['final_loss']:.4f}, {summary['time']:.0f} s; "
              f"logs and checkpoints in {summary['out_dir']}")
    return 0


def torchrun(args: argparse.Namespace) -> int:
    from isolocal.train.launch import launch_torchrun  # deferred: --help runs without torch

    return launch_torchrun(args.rest)


def export(args: argparse.Namespace) -> int:
    from isolocal.io.export import timm_load_line, write_timm_export  # deferred: --help runs without torch

    load_imports(args.imports)
    out, sidecar, name, kwargs = write_timm_export(args.ckpt, args.out)
    print(f"wrote {out} and {sidecar}; load with {timm_load_line(out, name, kwargs)}")
    return 0


def info(args: argparse.Namespace) -> int:
    cfg = load_run_config(args.config, args.overrides, args.imports)
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    repeats = args.repeats if args.measure else 0  # 0: counted, not timed
    from isolocal.models.stage_cost import stage_report  # deferred: --help runs without torch

    plan = None
    if args.pipeline_stages is not None:  # first: its bad values fail before anything is measured
        # imports the pipeline package, which checks the installed deepspeed: only --pipeline-stages needs it
        from isolocal.train.pipeline.plan import plan_run

        micro_batches = cfg.pipeline.micro_batches if args.micro_batches is None else args.micro_batches
        plan = plan_run(cfg, args.pipeline_stages, micro_batches, args.micro_batch_size, args.bandwidth_gbs,
                        repeats, args.tflops)
    print(stage_report(cfg, repeats))
    if plan is not None:
        heading, rows = plan
        print(heading)
        print(rows.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    return 0
