"""Launches of several processes: what a pipeline launch must satisfy, and starting workers locally.

`check_pipeline(cfg, world)` needs only the config and the number of processes, so `isolocal pretrain
--nproc N` checks a launch before starting any worker; `check_launch(cfg)` reads the number from the
launcher's environment (torchrun / deepspeed set WORLD_SIZE and LOCAL_RANK in every worker). Both run
before DeepSpeed is imported or a process group starts (this module imports no DeepSpeed).
`launch_local` starts the workers of `--nproc N` and `launch_torchrun` those of `isolocal torchrun`
(torchrun's own arguments, for several nodes), both through torch's elastic agent (`supervise`) with what
plain torchrun lacks for a training run: SIGUSR1 (Slurm's warning before a time limit) is forwarded like
SIGINT and SIGTERM instead of killing the agent and orphaning its workers; the agent gives the workers
`SHUTDOWN_S` to finish their step and save before it kills them, and a second signal does not cut that
short; a signal ends the launcher with exit 130 and the workers' one line, not the agent's traceback.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import uuid
from collections.abc import Callable

from torch.distributed import run as torchrun
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from isolocal.config import ConfigError, RunConfig
from isolocal.config.schedule import resolve_schedule
from isolocal.core.device import resolve_device
from isolocal.errors import RunInterrupted
from isolocal.heads import StagePlan
from isolocal.train.loop import micro_batch_size

SPLIT = ("pipeline.micro_batches", "data-parallel replicas")  # how train.batch_size is split
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1)  # torchrun's, + Slurm's
SHUTDOWN_S = 600  # a signalled worker finishes its step and saves; torchrun's default (30 s) may cut a save short


def check_pipeline(cfg: RunConfig, world: int) -> tuple[int, int]:
    """(pipeline ranks, data-parallel replicas) of `cfg` over `world` processes, or a ConfigError naming
    the value (also for a `pipeline.schedule` the model cannot run, and for heads needing the next
    stage's live parameters, `man`)."""
    p, t = cfg.pipeline, cfg.train
    stages = len(cfg.model.taps)
    if not 1 <= p.stages <= stages:
        raise ConfigError(f"pipeline.stages must be between 1 and the model's {stages} stages, got {p.stages}")
    if world % p.stages:
        raise ConfigError(f"the launch has {world} processes, not a multiple of pipeline.stages ({p.stages})")
    dp = world // p.stages
    micro_batch_size(t, p.micro_batches, dp, SPLIT)
    if t.accum_steps != 1:
        raise ConfigError(f"train.accum_steps must be 1 with a pipeline (got {t.accum_steps}); "
                          "the pipeline accumulates pipeline.micro_batches micro-batches per step")
    if t.amp == "fp16":
        raise ConfigError("train.amp = 'fp16' is not supported by the pipeline runner; use auto, bf16 or off")
    if t.compile:
        raise ConfigError("train.compile = true is not supported by the pipeline runner (its stages run eager); "
                          "set train.compile = false or train with `isolocal pretrain`")
    plan = StagePlan.from_config(cfg.model)
    if "next_stage" in plan.needs:
        raise ConfigError(f"model.objective {' / '.join(plan.heads_needing('next_stage'))} reads the next stage's "
                          "live parameters, which a pipeline rank does not hold when the next stage trains on "
                          "another rank; train it with `isolocal pretrain` (one process, or data parallel with "
                          "--nproc)")
    resolve_schedule(p.schedule, plan.isolated)
    return p.stages, dp


def check_launch(cfg: RunConfig) -> tuple[int, int]:
    """`check_pipeline` for the launcher's WORLD_SIZE, or a clear error when no launcher started this process.
    Also points DeepSpeed at the CPU accelerator for a CPU run (read when deepspeed is first imported,
    which then does not warn that it found no GPU)."""
    if "WORLD_SIZE" not in os.environ or "LOCAL_RANK" not in os.environ:
        raise ConfigError("pipeline training runs one process per rank: launch with `torchrun --nproc-per-node N "
                          "...`, `deepspeed --num_gpus N ...` or `isolocal pretrain --nproc N ...` (WORLD_SIZE and "
                          "LOCAL_RANK are not set)")
    shape = check_pipeline(cfg, int(os.environ["WORLD_SIZE"]))
    if resolve_device(cfg.train.device).type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return shape


def launch_local(nproc: int, module_args: list[str]) -> int:
    """Run `python -m <module_args>` in `nproc` processes on this machine, as `torchrun --standalone
    --nproc-per-node <nproc>` does; returns 0, the exit code of the first worker that failed, or 130
    after a signal (see `supervise`)."""
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1,
                          signals_to_handle="", shutdown_timeout=shutdown_timeout())
    return supervise(lambda: elastic_launch(config, sys.executable)("-m", *module_args))


def launch_torchrun(argv: list[str]) -> int:
    """`torchrun <argv>` (its own arguments: `--nnodes`, `--node-rank`, `--rdzv-endpoint`, ...) under
    `supervise`. A bad argument exits 2 with torchrun's own usage line, before any worker starts."""
    parser = torchrun.get_args_parser()
    parser.prog = "isolocal torchrun"
    args = parser.parse_args(argv)
    args.signals_to_handle = ""
    if args.shutdown_timeout is None:
        args.shutdown_timeout = shutdown_timeout()
    return supervise(lambda: torchrun.run(args))


def shutdown_timeout() -> int:
    """Seconds the agent gives signalled workers to save: `SHUTDOWN_S` unless the user set torch's variable."""
    return int(os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", SHUTDOWN_S))


def supervise(launch: Callable[[], object]) -> int:
    """Run `launch` (torch's elastic agent, configured with `signals_to_handle=""` so that the signal
    handlers are ours, `stop_agent`); returns 0, the exit code of the first worker that failed, or 130
    when the launcher was signalled (the agent forwarded the signal, the workers saved and rank 0
    printed the line that says so).

    The workers print their own lines (rank 0 speaks for all, `isolocal.cli`); the agent's log lines,
    its failure summary and its traceback are not printed, so a failed launch shows only the workers'
    reason."""
    for name, log in logging.root.manager.loggerDict.items():  # set up at import, each with its own level
        if name.startswith("torch.distributed") and isinstance(log, logging.Logger):
            log.setLevel(logging.CRITICAL)
    previous = {sig: signal.signal(sig, stop_agent) for sig in STOP_SIGNALS}
    try:
        launch()
    except ChildFailedError as err:
        code = err.get_first_failure()[1].exitcode
        return code if code > 0 else 128 - code  # a worker ended by a signal: the shell's code for it
    except SignalException:  # the workers got the signal too, saved their state and said so
        return RunInterrupted.exit_code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def stop_agent(signum: int, frame: object) -> None:
    """The agent's signal handler: its `SignalException` makes the agent forward the signal to the
    workers and wait for them (up to `SHUTDOWN_S`); signals after the first are ignored meanwhile, so a
    repeated Ctrl-C or Slurm's next warning cannot end the wait while they save."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    raise SignalException(f"Process {os.getpid()} got signal: {signum}", sigval=signal.Signals(signum))
