"""Slurm batch scripts for a pre-training run and for a study, written next to the run and submitted
with `sbatch`: what `isolocal submit` does.

Why generated scripts rather than a Python submitter: they need nothing but Slurm on the cluster, a
user can read and edit them before submitting (`--dry-run`), and a requeued job runs the same file.

How a job comes back where it stopped:
- `--signal=USR1@<s>` makes Slurm send SIGUSR1 to every task `<s>` seconds before the time limit; a
  preemption or `scontrol requeue` sends SIGTERM. Either way every rank finishes its step, the run
  saves at that step boundary and exits 130 (`isolocal.train.loop`).
- On 130 the script requeues its own job (`scontrol requeue`; under a preemption Slurm requeues it
  itself). The requeued job starts the same script again, which finds the run's checkpoint and
  passes `--resume`: resume is exact, so the run ends bit-identical to an uninterrupted one.
- A job started more than `--max-requeues` times (`SLURM_RESTART_COUNT`) says so in one line and
  exits 3 instead of running again.

Several processes (`--nodes` x tasks per node): `srun` starts one task per rank and each task gets
the variables torchrun would set (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR = the first node,
MASTER_PORT from the job id), so signals reach every rank directly, with no launcher between.
A study is one job array: one array task per run to do, each running the run's own job process
(`python -m isolocal.study.job <run dir>`); `isolocal compare --report-only` collects them.
"""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

INTERRUPTED = 130  # the exit code of a run that saved its state after a signal
TOO_MANY_REQUEUES = 3
_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")  # Slurm's --time: [days-]hours[:minutes[:seconds]] or minutes


@dataclass
class SlurmJob:
    """The resources and requeue policy of one submission (the `isolocal submit` options)."""

    time: str = "2:00:00"
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int = 0  # 0: one per GPU, or 1 without GPUs
    cpus_per_task: int = 0  # 0: Slurm's default
    partition: str = ""
    signal_before_s: int = 120
    max_requeues: int = 3
    array_parallel: int = 0  # studies: at most this many array tasks at once (0: no limit)

    def __post_init__(self) -> None:
        for name in ("nodes",):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("gpus_per_node", "tasks_per_node", "cpus_per_task", "signal_before_s", "max_requeues",
                     "array_parallel"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-').removesuffix('-s')} must be >= 0, got {getattr(self, name)}")
        if not _TIME.match(self.time):
            raise ValueError(f"--time {self.time!r} is not a Slurm time limit; use minutes, H:MM:SS or D-HH:MM:SS")

    @property
    def tasks(self) -> int:
        """Tasks (ranks) per node."""
        return self.tasks_per_node or self.gpus_per_node or 1

    def header(self, name: str, output: Path, array: str = "") -> list[str]:
        """The #SBATCH lines; the job runs in the directory it was submitted from (relative paths in
        configs mean what they meant there)."""
        lines = [f"--job-name={name}", f"--chdir={Path.cwd()}", f"--nodes={self.nodes}", f"--ntasks-per-node={self.tasks}",
                 f"--time={self.time}", f"--signal=USR1@{self.signal_before_s}", "--requeue", "--open-mode=append",
                 f"--output={output}"]
        lines += [f"--gpus-per-node={self.gpus_per_node}"] if self.gpus_per_node else []
        lines += [f"--cpus-per-task={self.cpus_per_task}"] if self.cpus_per_task else []
        lines += [f"--partition={self.partition}"] if self.partition else []
        lines += [f"--array={array}"] if array else []
        return [f"#SBATCH {line}" for line in lines]


def _requeue_guard(max_requeues: int) -> str:
    return f"""restarts=${{SLURM_RESTART_COUNT:-0}}
if [ "$restarts" -gt {max_requeues} ]; then
  echo "isolocal: job $SLURM_JOB_ID was requeued $restarts times, more than --max-requeues {max_requeues}; not running it again (resubmit it to go on from its checkpoint)" >&2
  exit {TOO_MANY_REQUEUES}
fi"""


def _requeue_on_interrupt(job_id: str) -> str:
    return f"""if [ "$code" -eq {INTERRUPTED} ]; then
  echo "isolocal: job {job_id} saved its state after a signal; requeueing it"
  scontrol requeue "{job_id}"
  exit 0
fi
exit "$code\""""


def _ranks(command: str, ranks: int) -> str:
    """`srun` of `command`: one task per rank, each with torchrun's variables when there are several."""
    if ranks == 1:
        return f"srun --ntasks=1 {command}"
    env = ('RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS '
           'LOCAL_WORLD_SIZE=$SLURM_NTASKS_PER_NODE')
    return ("export MASTER_ADDR=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1)\n"
            "export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))\n"
            f"srun bash -c '{env} exec \"$@\"' isolocal-rank {command}")


def _script(header: list[str], body: str) -> str:
    return "\n".join(["#!/bin/bash", *header, "# Written by `isolocal submit`; see isolocal/cluster/slurm.py for how",
                      "# a signalled job saves, requeues and resumes.", "set -u", body, ""])


def pretrain_script(config: Path, out_dir: Path, job: SlurmJob) -> str:
    """A batch script that runs `isolocal pretrain -c config` (a resolved config: its `imports` included)
    on `job.nodes` x `job.tasks` ranks, resuming when the run directory holds a checkpoint and
    requeueing itself after a signal."""
    python = shlex.quote(sys.executable)
    command = f"{python} -m isolocal pretrain -c {shlex.quote(str(config))} $resume"
    out = shlex.quote(str(out_dir))
    body = f"""{_requeue_guard(job.max_requeues)}
resume=""
if [ -e {out}/last.pt ] || [ -e {out}/pipeline/latest ]; then resume="--resume"; fi
{_ranks(command, job.nodes * job.tasks)}
code=$?
{_requeue_on_interrupt("$SLURM_JOB_ID")}"""
    return _script(job.header(f"isolocal-{out_dir.name}", out_dir / "slurm-%j.out"), body)


def study_script(name: str, run_list: Path, count: int, logs: Path, job: SlurmJob) -> str:
    """A job array over the `count` run directories listed in `run_list`, one line each: task i runs
    line i + 1's job process; a signalled task requeues itself and resumes its run."""
    if job.nodes * job.tasks != 1:
        raise ValueError("a study's runs are single-process: submit it with --nodes 1 and one task per node")
    array = f"0-{count - 1}" + (f"%{job.array_parallel}" if job.array_parallel else "")
    python = shlex.quote(sys.executable)
    body = f"""{_requeue_guard(job.max_requeues)}
run_dir=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {shlex.quote(str(run_list))})
srun --ntasks=1 {python} -m isolocal.study.job "$run_dir"
code=$?
{_requeue_on_interrupt("${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}")}"""
    return _script(job.header(f"isolocal-{name}", logs / "slurm-%A_%a.out", array), body)


def sbatch(script: Path, env: dict[str, str] | None = None) -> str:
    """Submit `script`; its job id, or a one-line error with sbatch's own message."""
    try:
        done = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, env=env)
    except FileNotFoundError:
        raise ValueError("sbatch not found: isolocal submit needs Slurm's commands on PATH (run it on a "
                           f"login node), or use --dry-run to only write {script}") from None
    if done.returncode:
        raise ValueError(f"sbatch refused {script}: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout.strip().split(";")[0]
