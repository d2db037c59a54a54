"""Interrupts and mid-epoch checkpoints: Ctrl-C (SIGINT) or SIGTERM finishes the step, saves, exits 130
with one line; resuming ends bit-identical to an uninterrupted run (weights, optimizer, RNG states)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import isolocal
from isolocal.io.checkpoint import LAST, load_state
from isolocal.testing.runs import (
    assert_equal_state,
    assert_same_run,
    steps_logged,
    untimed,
)

REPO = Path(isolocal.__file__).resolve().parents[1]
# 12 steps per epoch (96 images, batch 8), 2 epochs: an interrupt after a few steps lands mid-epoch.
RUN = ["data.name=synthetic", "data.synthetic_size=96", "train.batch_size=8", "train.epochs=2",
       "train.log_every=1", "train.warmup_epochs=0.5"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def pretrain(out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "isolocal.cli", "pretrain", "--set", *RUN, *extra, "--out",
                             str(out)], cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def interrupt_after(out: Path, steps: int, sig: int, *extra: str) -> tuple[int, str]:
    proc = pretrain(out, *extra)
    deadline = time.time() + 300
    while steps_logged(out) < steps and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT], ids=["SIGINT"])  # SIGTERM / SIGUSR1: test_submit.py, test_nodes.py
def test_an_interrupt_saves_mid_epoch_and_resume_is_bit_identical(tmp_path, sig):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    code, err = interrupt_after(cut, 3, sig)
    assert code == 130, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("isolocal")]
    assert len(lines) == 1 and "Traceback" not in err
    assert f"interrupted by {signal.Signals(sig).name} after step" in lines[0]
    assert "continue with the same command plus --resume" in lines[0] and str(cut / LAST) in lines[0]
    stopped = load_state(cut / LAST)
    assert 0 < stopped["step"] < 12 and stopped["step_in_epoch"] == stopped["step"]  # mid-epoch 1
    assert f"after step {stopped['step']} " in lines[0]

    resumed = subprocess.run([sys.executable, "-m", "isolocal.cli", "pretrain", "--set", *RUN, "--out", str(cut),
                              "--resume"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert pretrain(whole).wait(timeout=300) == 0
    assert_same_run(whole, cut)


@pytest.mark.slow
def test_ckpt_every_steps_saves_mid_epoch_and_a_killed_run_resumes_from_it_exactly(tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    code, _ = interrupt_after(cut, 7, signal.SIGKILL, "train.ckpt_every_steps=5")
    assert code == -signal.SIGKILL
    assert load_state(cut / LAST)["step"] == 5  # saved at step 5, mid-epoch, no epoch file yet
    assert not list(cut.glob("epoch_*.pt"))
    resumed = subprocess.run([sys.executable, "-m", "isolocal.cli", "pretrain", "--set", *RUN,
                              "train.ckpt_every_steps=5", "--out", str(cut), "--resume"], cwd=REPO, env=ENV,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert pretrain(whole, "train.ckpt_every_steps=5").wait(timeout=300) == 0
    a, b = load_state(whole / LAST), load_state(cut / LAST)
    for key in ("model", "optimizer", "step"):
        assert_equal_state(a[key], b[key], key)
    assert untimed(whole) == untimed(cut)


def test_ckpt_every_minutes_saves_on_the_clock(tmp_path):
    """0.0001 minutes: due after every step, so every step writes last.pt (the step counter shows it)."""
    out = tmp_path / "clock"
    code, _ = interrupt_after(out, 4, signal.SIGKILL, "train.ckpt_every_minutes=0.0001")
    assert code == -signal.SIGKILL
    assert load_state(out / LAST)["step"] >= 3


PIPE = ["data.name=synthetic", "data.synthetic_size=160", "train.batch_size=16", "train.epochs=1",
        "train.log_every=1", "train.warmup_epochs=0.5", "train.base_lr=0.01", "pipeline.micro_batches=2",
        "pipeline.timeout_s=60", "model.boundary=isolated"]  # 10 steps


def pipeline_ranks(out: Path, *extra: str) -> list[subprocess.Popen]:
    """Two pipeline ranks wired like torchrun does, each in its own session (so a test can signal both)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {**ENV, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "DS_ACCELERATOR": "cpu"}
        procs.append(subprocess.Popen([sys.executable, "-m", "isolocal.cli", "pretrain", "--set", *PIPE,
                                       "--pipeline-stages", "2", "--out", str(out), *extra], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      start_new_session=True))
    return procs


def finish(procs: list[subprocess.Popen]) -> list[tuple[int, str]]:
    done = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            _, err = p.communicate()
        done.append((p.returncode, err))
    return done


@pytest.mark.slow
def test_a_two_stage_pipeline_interrupted_by_sigint_resumes_exactly(tmp_path):
    from isolocal.io.checkpoint import pipeline_client_state, pipeline_state_dict

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    procs = pipeline_ranks(cut)
    deadline = time.time() + 300
    while steps_logged(cut) < 3 and all(p.poll() is None for p in procs) and time.time() < deadline:
        time.sleep(0.05)
    for p in procs:  # Ctrl-C reaches every process of the foreground group
        p.send_signal(signal.SIGINT)
    (code0, err0), (code1, err1) = finish(procs)
    assert (code0, code1) == (130, 130), err0[-3000:] + err1[-3000:]
    lines = [line for line in err0.splitlines() if line.startswith("isolocal")]
    assert len(lines) == 1 and "interrupted by SIGINT after step" in lines[0]
    assert not [line for line in err1.splitlines() if line.startswith("isolocal")]  # rank 0 speaks for both
    stopped = pipeline_client_state(cut / "pipeline")["step"]
    assert 0 < stopped < 10

    assert [c for c, _ in finish(pipeline_ranks(cut, "--resume"))] == [0, 0]
    assert [c for c, _ in finish(pipeline_ranks(whole))] == [0, 0]
    a, b = pipeline_state_dict(whole / "pipeline"), pipeline_state_dict(cut / "pipeline")
    assert_equal_state(a, b, "weights")
    assert [r for r in untimed(whole) if r["kind"] == "step"] == [r for r in untimed(cut) if r["kind"] == "step"]
