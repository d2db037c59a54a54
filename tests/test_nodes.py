"""Several nodes, tested on one machine, and signals under launchers.

Two `torchrun` agents act as two nodes (`--nnodes 2 --node-rank 0|1`, c10d rendezvous on 127.0.0.1,
gloo, one worker each): data parallel across them ends exactly where the one-node launch ends, a
pipeline with one stage per node (under torchrun, and under DeepSpeed's hostfile launcher with each
node started on its own) ends at the single-process parameters, every file is written by the
one rank that owns it, and an interrupted run resumes. A node that cannot see rank 0's out_dir stops
before training. `isolocal torchrun` and `pretrain --nproc` end a signalled run (SIGINT, SIGTERM,
SIGUSR1; to the launcher alone or to its whole process group) in one line and exit 130.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from torch.distributed.elastic.multiprocessing.api import SignalException

import isolocal
from isolocal.config.load import load_run_config
from isolocal.io.checkpoint import LAST, load_model_state, load_state
from isolocal.testing.launch import free_port
from isolocal.testing.runs import assert_close_states, assert_same_run, steps_logged
from isolocal.train import train
from isolocal.train.launch import STOP_SIGNALS, stop_agent

REPO = Path(isolocal.__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
       "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
ISOLOCAL_TORCHRUN = [sys.executable, "-m", "isolocal.cli", "torchrun"]
# 12 steps per epoch (96 images, batch 8 over 2 ranks), 2 epochs: a signal after a few steps lands mid-epoch.
RUN = ["data.name=synthetic", "data.synthetic_size=96", "train.batch_size=8", "train.epochs=2", "train.log_every=1"]
PIPE = ["data.name=synthetic", "data.synthetic_size=96", "train.batch_size=16", "train.epochs=1", "train.log_every=1",
        "train.base_lr=0.01", "pipeline.micro_batches=2", "pipeline.timeout_s=60", "model.boundary='isolated'"]

# Imported by every worker (`--import`): records the final name of every file the process writes under
# AUDIT_OUT (temp files renamed into place, links, `torch.save` paths, files opened for writing).
AUDIT = '''
import os, sys, torch
_out = os.path.realpath(os.environ["AUDIT_OUT"])
_log = open(os.path.join(os.environ["AUDIT_DIR"], "rank" + os.environ.get("RANK", "0")), "a", buffering=1)

def _record(path):
    path = os.path.realpath(os.fsdecode(path))
    if path.startswith(_out + os.sep) and not os.path.basename(path).startswith("."):  # not temps
        _log.write(os.path.relpath(path, _out) + "\\n")

def _hook(event, args):
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        mode, flags = args[1], args[2]
        if (mode and set(mode) & set("wax+")) or (mode is None and flags & (os.O_WRONLY | os.O_RDWR)):
            _record(args[0])
    elif event in ("os.rename", "os.link"):
        _record(args[1])

sys.addaudithook(_hook)
_save = torch.save

def _saving(obj, f, *args, **kwargs):
    if isinstance(f, (str, os.PathLike)):
        _record(f)
    return _save(obj, f, *args, **kwargs)

torch.save = _saving
'''


def node_command(launcher: str, node: int, port: int, hostfile: Path | None) -> list[str]:
    """How `launcher` ("torchrun", "isolocal torchrun" or DeepSpeed's hostfile launcher, "deepspeed")
    starts node `node` of two, one worker each, running `python -m isolocal.cli ...`."""
    if launcher == "deepspeed":  # each node started on its own (`--no_ssh`): this machine has no ssh / pdsh
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--no_ssh",
                "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port),
                "--no_local_rank", "--module", "isolocal.cli"]
    return [*(TORCHRUN if launcher == "torchrun" else ISOLOCAL_TORCHRUN), "--nnodes", "2", "--node-rank", str(node),
            "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
            "--rdzv-id", f"nodes{port}", "-m", "isolocal.cli"]


def two_nodes(launcher: str, out: str | Path, *args: str, cwds: tuple[Path, Path] = (REPO, REPO),
              audit: Path | None = None, hostfile: Path | None = None) -> list[subprocess.Popen]:
    """`launcher` started twice, as node 0 and node 1 of one launch, each in its own session, running
    `isolocal pretrain ... --out out` with one worker."""
    port = free_port()
    env = dict(ENV)
    if audit is not None:
        audit.mkdir(parents=True)
        (audit / "audit.py").write_text(AUDIT)
        env.update(AUDIT_DIR=str(audit), AUDIT_OUT=str(out))
        args = (*args, "--import", str(audit / "audit.py"))
    return [subprocess.Popen([*node_command(launcher, node, port, hostfile), "pretrain", *args, "--out", str(out)],
                             cwd=cwds[node], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True) for node in range(2)]


def finish(procs: list[subprocess.Popen], timeout: float = 300) -> list[tuple[int, str]]:
    """(exit code, output) of each process; one still running at the deadline is killed with its group."""
    done = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, _ = p.communicate()
        done.append((p.returncode, out))
    return done


def wait_for_steps(out: Path, steps: int, procs: list[subprocess.Popen]) -> None:
    deadline = time.time() + 300
    while steps_logged(out) < steps and all(p.poll() is None for p in procs) and time.time() < deadline:
        time.sleep(0.05)
    assert steps_logged(out) >= steps, "the run ended or stalled before it could be signalled"


def our_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("isolocal ")]


def writers(audit: Path) -> dict[int, Counter]:
    """Per rank: how many times it wrote each file (paths relative to the run directory)."""
    return {int(f.name[4:]): Counter(f.read_text().split()) for f in audit.glob("rank*")}


def assert_owned_once(written: dict[int, Counter]) -> None:
    """No file written by two ranks; every checkpoint file written exactly once (one save in the run)."""
    owners = Counter(path for counts in written.values() for path in counts)
    assert all(n == 1 for n in owners.values()), [p for p, n in owners.items() if n > 1]
    for counts in written.values():
        assert all(n == 1 for path, n in counts.items() if path.endswith(".pt")), counts


def one_node(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "isolocal.cli", "pretrain", "--nproc", "2", "--set", *RUN, *extra,
                           "--out", str(out)], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300,
                          check=False)


@pytest.fixture(scope="module")
def one_node_run(tmp_path_factory) -> Path:
    """The uninterrupted data-parallel run on one node (`pretrain --nproc 2`), for runs to end at."""
    out = tmp_path_factory.mktemp("one_node") / "run"
    done = one_node(out)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.slow
def test_data_parallel_across_two_nodes_saves_each_file_once_and_resumes_to_the_one_node_run(tmp_path, one_node_run):
    out = tmp_path / "run"
    procs = two_nodes("torchrun", out, "--set", *RUN, audit=tmp_path / "audit")
    wait_for_steps(out, 3, procs)
    for p in procs:  # the whole job, as `scancel` signals every node
        os.killpg(p.pid, signal.SIGTERM)
    outputs = [output for _, output in finish(procs)]
    for output in outputs:  # plain torchrun adds its own SignalException report; each node says ours once
        assert len([line for line in our_lines(output) if "interrupted by SIGTERM" in line]) == 1, output[-3000:]
    assert 3 <= load_state(out / LAST)["step"] < 24

    written = writers(tmp_path / "audit")
    assert_owned_once(written)
    assert set(written[0]) >= {LAST, "metrics.jsonl", "config.toml"} and not written.get(1)  # rank 0 owns them all

    resumed = finish(two_nodes("torchrun", out, "--set", *RUN, "--resume"))
    assert [code for code, _ in resumed] == [0, 0], resumed[0][1][-3000:] + resumed[1][1][-3000:]
    assert_same_run(one_node_run, out)  # weights, optimizer, every rank's RNG states and every log record


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_a_pipeline_with_one_stage_per_node_gives_the_single_process_parameters(tmp_path, launcher):
    single = load_run_config(None, [*PIPE, "train.accum_steps=2", f"out_dir='{tmp_path / 'single'}'"])
    train(single)
    out, hostfile = tmp_path / "pipe", tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")  # DeepSpeed's format: one line per node
    done = finish(two_nodes(launcher, out, "--set", *PIPE, "--pipeline-stages", "2", audit=tmp_path / "audit",
                            hostfile=hostfile))
    assert [code for code, _ in done] == [0, 0], done[0][1][-3000:] + done[1][1][-3000:]
    assert_close_states(load_model_state(tmp_path / "single" / LAST)[1], load_model_state(out)[1])

    written = writers(tmp_path / "audit")
    assert_owned_once(written)
    assert {"metrics.jsonl", "config.toml"} <= set(written[0])
    assert written[1] and all(path.startswith("pipeline/") for path in written[1])  # its own stage's files


@pytest.mark.slow
def test_a_node_that_cannot_see_rank_0s_out_dir_stops_before_training(tmp_path):
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"  # two nodes without a shared file system
    here.mkdir()
    elsewhere.mkdir()
    done = finish(two_nodes("isolocal torchrun", "run", "--set", *RUN, cwds=(here, elsewhere)))
    assert [code for code, _ in done] == [2, 2], done[0][1][-3000:] + done[1][1][-3000:]
    for _, output in done:  # each node says why, once, without a traceback
        assert len(our_lines(output)) == 1 and "Traceback" not in output, output[-3000:]
        assert "cannot see what rank 0 wrote to out_dir run" in our_lines(output)[0]
    assert not list(tmp_path.rglob("metrics.jsonl"))


@pytest.mark.parametrize("sig", STOP_SIGNALS, ids=[sig.name for sig in STOP_SIGNALS])
def test_the_launchers_first_signal_stops_the_agent_and_the_next_ones_are_ignored(sig):
    """Each signal the launchers handle (SIGTERM included, which the launches below do not send) raises
    the exception on which torch's agent forwards it to the workers, and leaves every one ignored."""
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    try:
        for s in STOP_SIGNALS:
            signal.signal(s, stop_agent)
        with pytest.raises(SignalException) as stopped:
            signal.raise_signal(sig)
        assert stopped.value.sigval == sig
        assert all(signal.getsignal(s) == signal.SIG_IGN for s in STOP_SIGNALS)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def launched(launcher: str, out: Path) -> subprocess.Popen:
    """2 data-parallel workers on this machine, started by `isolocal torchrun` or `pretrain --nproc`."""
    if launcher == "torchrun":
        cmd = [*ISOLOCAL_TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "isolocal.cli", "pretrain"]
    else:
        cmd = [sys.executable, "-m", "isolocal.cli", "pretrain", "--nproc", "2"]
    return subprocess.Popen([*cmd, "--set", *RUN, "--out", str(out)], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


@pytest.mark.slow
@pytest.mark.parametrize(("launcher", "sig", "to_group", "twice"), [
    ("torchrun", signal.SIGUSR1, False, True),  # Slurm's warning, repeated while the workers save
    ("nproc", signal.SIGINT, True, False),  # Ctrl-C in a terminal reaches the whole group
], ids=["torchrun-USR1-launcher-twice", "nproc-INT-group"])
def test_a_signal_under_a_launcher_saves_every_rank_and_ends_in_one_line(tmp_path, one_node_run, launcher, sig,
                                                                          to_group, twice):
    out = tmp_path / "run"
    proc = launched(launcher, out)
    wait_for_steps(out, 3, [proc])
    for _ in range(2 if twice else 1):
        if to_group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        time.sleep(0.05)
    [(code, output)] = finish([proc])
    assert code == 130, output[-3000:]
    assert len(our_lines(output)) == 1 and "Traceback" not in output, output[-3000:]
    assert f"interrupted by {sig.name} after step" in our_lines(output)[0]
    assert 3 <= load_state(out / LAST)["step"] < 24  # the checkpoint written at the signal is whole
    if twice:  # the save the second signal could have cut short resumes exactly (the others save alike)
        resumed = one_node(out, "--resume")
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert_same_run(one_node_run, out)
