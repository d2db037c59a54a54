"""A real Slurm cluster of one node on this machine, for tests.

Why: how a run behaves under Slurm (requeued, signalled before its time limit, restarted with
`SLURM_RESTART_COUNT`) is only believable when a real `slurmctld` schedules it; a mocked `sbatch` tests
our idea of Slurm, not Slurm. `LocalSlurm` runs `munged`, `slurmctld` and `slurmd` from Debian's
`slurm-wlm` (22.05) with everything they write (config, state, spool, logs, pid files, the munge socket
and key) inside one scratch directory and on free ports, so it needs no system setup beyond the packages
(`.ci/install`), does not touch a system Slurm or munge, and leaves no process behind.

There is no accounting database, so finished jobs are read with `scontrol show job` while the controller
still knows them (`MinJobAge` keeps them for an hour). The daemons run as the current user (`SlurmUser`,
`SlurmdUser`), so do its jobs; root is not needed. Linux only (`/proc` finds what a job left behind).
"""
from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Self

# Unix sockets live in the scratch directory (munge's; slurmd's one per job step, named like
# `localhost_4294967294.4294967294`), and a socket path may hold at most 107 bytes.
MAX_SCRATCH_CHARS = 60
COMMANDS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "squeue", "scancel")
DAEMONS = ("munged", "slurmctld", "slurmd")
# The states a job ends in (`scontrol show job` keeps them until MinJobAge); REQUEUED and
# COMPLETING are on the way somewhere else.
FINISHED = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
                      "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"})
# Variables a surrounding Slurm job (the tests may run inside one) would pass to our commands as options.
FOREIGN_ENV_PREFIXES = ("SLURM_", "SBATCH_", "SALLOC_", "SRUN_", "SQUEUE_", "SINFO_", "SCONTROL_", "SCANCEL_")
NODE = "localhost"
PARTITION = "debug"
# A requeued job waits this long before it may start again (Slurm's default is 120 s).
CRED_EXPIRE_S = 5


class SlurmError(RuntimeError):
    """Local Slurm did not start, or a job did not get where it was waited for; the message has the
    daemons' log tails."""


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _tail(path: Path, lines: int = 25) -> str:
    if not path.exists():
        return f"--- {path.name}: not written"
    return f"--- {path.name}:\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


class LocalSlurm:
    """One controller and one node (`localhost`, all of this machine's CPUs and memory) in `scratch`.

    `start()` brings it up and waits until the node is idle; `env` is the environment for Slurm commands
    (`SLURM_CONF` set); `stop()` cancels every job and ends every process it started. Also a context manager.
    """

    def __init__(self, scratch: Path, startup_timeout: float = 60.0) -> None:
        scratch = Path(scratch).resolve()
        if len(str(scratch)) > MAX_SCRATCH_CHARS:
            raise ValueError(f"scratch directory {scratch} is {len(str(scratch))} characters long; Slurm's and "
                             f"munge's Unix sockets live in it, so it may be at most {MAX_SCRATCH_CHARS}")
        if startup_timeout <= 0:
            raise ValueError(f"startup_timeout must be positive seconds, got {startup_timeout}")
        self.scratch = scratch
        self.startup_timeout = startup_timeout
        self.conf = scratch / "slurm.conf"
        self.jobs_dir = scratch / "jobs"  # sbatch runs here, so `slurm-<id>.out` lands here
        self.log_dir = scratch / "log"
        self.munge_socket = scratch / "munge" / "munge.socket"
        self.env = {name: value for name, value in os.environ.items() if not name.startswith(FOREIGN_ENV_PREFIXES)}
        self.env["SLURM_CONF"] = str(self.conf)
        self._daemons: dict[str, subprocess.Popen] = {}

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- bringing it up and down ---

    def start(self) -> None:
        """Write the config, start munged, slurmctld and slurmd, and wait until the node is idle. On any
        failure the started daemons are stopped and SlurmError says why, with their log tails."""
        missing = [command for command in COMMANDS if shutil.which(command) is None]
        if missing:
            raise SlurmError(f"Slurm is not installed (missing {', '.join(missing)}): "
                             "run 'apt-get install slurm-wlm munge' as root (.ci/install does)")
        try:
            self._write_config()
            self._start_munged()
            self._start_daemon("slurmctld", ["slurmctld", "-D", "-c"])
            self._start_daemon("slurmd", ["slurmd", "-D", "-N", NODE])
            self.until(self._node_idle, self.startup_timeout, f"node {NODE} to be idle in sinfo")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Cancel every job, stop the daemons, and kill whatever still runs under this config (a job step
        that outlived its slurmd). The scratch directory stays, with the logs."""
        if self._daemons.get("slurmctld") and self._daemons["slurmctld"].poll() is None:
            self._cancel_all_jobs()
        for name in reversed(DAEMONS):
            if name in self._daemons:
                self._end(self._daemons.pop(name))
        for pid in self._leftover_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _write_config(self) -> None:
        for sub in ("state", "spool", "log", "run", "munge", "jobs"):
            (self.scratch / sub).mkdir(parents=True, exist_ok=True)
        (self.scratch / "munge").chmod(0o755)  # munged wants its socket directory open to all
        ctld_port, slurmd_port = _free_ports(2)
        user = pwd.getpwuid(os.getuid()).pw_name
        memory_mib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
        s = self.scratch
        self.conf.write_text(f"""\
ClusterName=isolocal-local
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire={CRED_EXPIRE_S}
StateSaveLocation={s}/state
SlurmdSpoolDir={s}/spool
SlurmctldPidFile={s}/run/slurmctld.pid
SlurmdPidFile={s}/run/slurmd.pid
SlurmctldLogFile={self.log_dir}/slurmctld.log
SlurmdLogFile={self.log_dir}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=1
PreemptType=preempt/none
ReturnToService=2
JobRequeue=1
MaxJobCount=1000
MinJobAge=3600
MessageTimeout=5
SlurmdTimeout=30
KillWait=2
InactiveLimit=0
MailProg=/bin/true
SlurmdParameters=config_overrides
NodeName={NODE} NodeAddr=127.0.0.1 CPUs={os.cpu_count() or 1} RealMemory={memory_mib} State=UNKNOWN
PartitionName={PARTITION} Nodes={NODE} Default=YES MaxTime=INFINITE State=UP
""")

    def _start_munged(self) -> None:
        key = self.scratch / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        munge = self.scratch / "munge"
        self._start_daemon("munged", ["munged", "--foreground", "--force", f"--socket={self.munge_socket}",
                                      f"--key-file={key}", f"--pid-file={munge}/munged.pid",
                                      f"--seed-file={munge}/munged.seed"])
        self.until(self.munge_socket.exists, 10.0, f"munged's socket {self.munge_socket}")

    def _start_daemon(self, name: str, command: list[str]) -> None:
        with open(self.log_dir / f"{name}.out", "wb") as out:
            self._daemons[name] = subprocess.Popen(command, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                                   stdin=subprocess.DEVNULL, start_new_session=True)

    @staticmethod
    def _end(process: subprocess.Popen, grace: float = 5.0) -> None:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(grace)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def _cancel_all_jobs(self) -> None:
        def jobs() -> list[str]:
            return self.run("squeue", "--noheader", "--format=%i", check=False).split()

        if jobs():
            self.run("scancel", *jobs(), check=False)
            try:
                self.until(lambda: not jobs(), 10.0, "cancelled jobs to end")
            except SlurmError:
                pass  # stop() kills what is left

    def _leftover_pids(self) -> list[int]:
        """Processes whose environment names this config: job steps and jobs a dead slurmd left behind."""
        marker = f"SLURM_CONF={self.conf}".encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
            except OSError:  # gone meanwhile, or not ours to read
                continue
        return pids

    def _node_idle(self) -> bool:
        for name, process in self._daemons.items():
            if process.poll() is not None:
                raise SlurmError(f"{name} exited with code {process.returncode} while starting\n{self.log_tails()}")
        states = self.run("sinfo", "--noheader", "--Node", f"--nodes={NODE}", "--format=%T", check=False)
        return states.strip() == "idle"

    def log_tails(self) -> str:
        """The end of each daemon's log, for error messages: its log file, or what it printed before it had one
        (munged prints only; slurmctld and slurmd print what they log too)."""
        tails = []
        for name in DAEMONS:
            log = self.log_dir / f"{name}.log"
            tails.append(_tail(log if log.exists() and log.stat().st_size else self.log_dir / f"{name}.out"))
        return "\n".join(tails)

    # --- jobs ---

    def sbatch(self, script: Path, *options: str) -> str:
        """Submit `script` with sbatch `options` (placed before the script); returns the job id. The job's
        working directory and default output (`slurm-<id>.out`) are in `jobs_dir` unless options say otherwise."""
        output = self.run("sbatch", "--parsable", *options, str(Path(script).resolve()))
        return output.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as fields (a value with spaces keeps its first word); empty when the controller
        does not know the job."""
        return dict(re.findall(r"(\w+)=(\S*)", self.run("scontrol", "show", "job", "--oneliner", job_id, check=False)))

    def state(self, job_id: str) -> str:
        """The job's state (PENDING, RUNNING, COMPLETED, ...); raises SlurmError for a job Slurm does not know."""
        fields = self.job(job_id)
        if "JobState" not in fields:
            raise SlurmError(f"Slurm does not know job {job_id!r}")
        return fields["JobState"]

    def wait(self, job_id: str, timeout: float, states: frozenset[str] | set[str] = FINISHED) -> str:
        """Poll the job until its state is one of `states` (default: any final state) and return that state;
        SlurmError after `timeout` seconds, with the job, its output and the daemons' logs."""
        reached: list[str] = []

        def arrived() -> bool:
            reached.append(self.state(job_id))
            return reached[-1] in states

        self.until(arrived, timeout, f"job {job_id} to be {' or '.join(sorted(states))}", job_id)
        return reached[-1]

    def output(self, job_id: str) -> str:
        """The job's default output file (`jobs_dir/slurm-<id>.out`), or "" before it exists."""
        path = self.jobs_dir / f"slurm-{job_id}.out"
        return path.read_text(errors="replace") if path.exists() else ""

    def describe(self, job_id: str) -> str:
        """The job's scontrol line and output tail, for failure messages."""
        fields = self.job(job_id)
        line = " ".join(f"{key}={value}" for key, value in fields.items()) or "(unknown to Slurm)"
        return f"job {job_id}: {line}\n--- its output:\n{self.output(job_id)[-2000:]}"

    # --- plumbing ---

    def run(self, *command: str, check: bool = True) -> str:
        """Run a Slurm command (`scontrol requeue 3`) against this cluster, in `jobs_dir`; its stdout. A failure
        raises SlurmError with its stderr and the daemons' log tails (unless not `check`)."""
        result = subprocess.run(command, env=self.env, cwd=self.jobs_dir, capture_output=True, text=True, timeout=30,
                                check=False)
        if check and result.returncode != 0:
            raise SlurmError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr.strip()}\n"
                             f"{self.log_tails()}")
        return result.stdout

    def until(self, condition: Callable[[], bool], timeout: float, what: str, job_id: str | None = None) -> None:
        """Poll `condition` until it holds; after `timeout` seconds SlurmError naming `what`, with the job's
        scontrol line and output (given `job_id`) and the daemons' log tails."""
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                job = f"{self.describe(job_id)}\n" if job_id else ""
                raise SlurmError(f"timed out after {timeout:g} s waiting for {what}\n{job}{self.log_tails()}")
            time.sleep(0.2)
