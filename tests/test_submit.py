"""`isolocal submit` on a real Slurm (the `local_slurm` fixture): a pre-training job that is preempted
(`scontrol requeue`: SIGTERM) and warned before its time limit (`scancel --signal=USR1`) saves at a
step boundary, comes back and ends bit-identical to an uninterrupted run; a job past its requeues says
so in one line; two ranks under srun train like two torchrun ranks; a study runs as a job array that
`compare --report-only` collects. Bad submissions fail before anything is written."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import isolocal
from isolocal.cli import main
from isolocal.config.load import load_run_config
from isolocal.io.checkpoint import LAST, load_state
from isolocal.testing.runs import steps_logged, untimed
from isolocal.testing.slurm import LocalSlurm
from isolocal.train import train

REPO = Path(isolocal.__file__).resolve().parents[1]
# 320 steps: long enough (about 15 s at one thread) to be signalled twice while it trains.
RUN = ["data.name=synthetic", "data.synthetic_size=64", "train.batch_size=8", "train.epochs=40", "train.log_every=1",
       "train.warmup_epochs=1", "model.boundary='isolated'"]


def submit(slurm: LocalSlurm, *args: str, cwd: Path) -> str:
    """Run `isolocal submit` against the local cluster; the job id it printed."""
    env = {**slurm.env, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "isolocal", "submit", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.split("submitted job ")[1].split(":")[0]


@pytest.mark.slow
def test_a_preempted_and_warned_job_resumes_bit_identical(local_slurm: LocalSlurm, tmp_path: Path):
    out = tmp_path / "slurm_run"
    job = submit(local_slurm, "--set", *RUN, f"out_dir={out}", "--time", "10", cwd=tmp_path)
    log = out / f"slurm-{job}.out"

    local_slurm.until(lambda: steps_logged(out) >= 30, 90, "30 steps", job)
    local_slurm.run("scontrol", "requeue", job)  # a preemption: SIGTERM to every task, Slurm requeues
    local_slurm.until(lambda: local_slurm.job(job).get("Restarts") == "1" and steps_logged(out) >= 140, 120,
                      "the requeued job to train on", job)
    local_slurm.run("scancel", "--signal=USR1", job)  # the time-limit warning: the script requeues itself
    assert local_slurm.wait(job, 240) == "COMPLETED", local_slurm.describe(job)
    text = log.read_text()
    assert local_slurm.job(job)["Restarts"] == "2", text[-3000:]
    assert text.count("interrupted by SIGTERM") == 1 and text.count("interrupted by SIGUSR1") == 1, text[-3000:]
    assert "saved its state after a signal; requeueing it" in text

    whole = tmp_path / "whole"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the job's thread count: the same sums bit for bit
    try:
        train(load_run_config(None, [*RUN, f"out_dir={whole}"]))
    finally:
        torch.set_num_threads(threads)
    assert untimed(whole) == untimed(out)
    a, b = load_state(whole / LAST)["model"], load_state(out / LAST)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_job_past_its_requeues_says_so(local_slurm: LocalSlurm, tmp_path: Path):
    out = tmp_path / "run"
    job = submit(local_slurm, "--set", *RUN, f"out_dir={out}", "--max-requeues", "0", cwd=tmp_path)
    local_slurm.until(lambda: steps_logged(out) >= 5, 90, "5 steps", job)
    local_slurm.run("scontrol", "requeue", job)
    assert local_slurm.wait(job, 90) == "FAILED", local_slurm.describe(job)
    lines = [line for line in (out / f"slurm-{job}.out").read_text().splitlines() if "more than --max-requeues" in line]
    assert lines == [f"isolocal: job {job} was requeued 1 times, more than --max-requeues 0; not running it again "
                     "(resubmit it to go on from its checkpoint)"]


@pytest.mark.slow
def test_two_ranks_under_srun_train_like_two_torchrun_ranks(local_slurm: LocalSlurm, tmp_path: Path):
    """srun gives each task torchrun's variables: two ranks under Slurm form one data-parallel group and
    end with the log and parameters of the same two ranks started by `pretrain --nproc 2` (torchrun's API)."""
    run = ["data.name=synthetic", "data.synthetic_size=32", "train.batch_size=8", "train.epochs=1", "train.log_every=1"]
    out = tmp_path / "dp"
    job = submit(local_slurm, "--set", *run, f"out_dir={out}", "--tasks-per-node", "2", cwd=tmp_path)
    assert local_slurm.wait(job, 120) == "COMPLETED", local_slurm.describe(job)
    local = tmp_path / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "isolocal", "pretrain", "--nproc", "2", "--set", *run, f"out_dir={local}"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert load_state(out / LAST)["world_size"] == 2 and untimed(out) == untimed(local)
    a, b = load_state(local / LAST)["model"], load_state(out / LAST)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_study_runs_as_a_job_array_and_report_only_collects_it(local_slurm: LocalSlurm, tmp_path: Path):
    path = tmp_path / "study.toml"
    path.write_text(f"""
[study]
out_dir = "{tmp_path / 'study'}"
images = "fmnist:0"
query = [[2, 2]]
[base]
preset = "localmim_vit_nano"
[base.data]
name = "fashion_mnist"
train_subset = 32
[base.train]
batch_size = 16
[base.eval]
feature = "mean"
knn_k = 5
linear_epochs = 1
train_subset = 64
test_subset = 32
[variants.trained]
[variants.random]
""")
    job = submit(local_slurm, "--study", str(path), "--array-parallel", "2", cwd=tmp_path)
    for task in (0, 1):
        assert local_slurm.wait(f"{job}_{task}", 180) == "COMPLETED", local_slurm.describe(f"{job}_{task}")
    assert main(["compare", "-c", str(path), "--report-only"]) == 0
    for variant in ("trained", "random"):
        assert json.loads((tmp_path / "study" / "runs" / variant / "result.json").read_text())["status"] == "ok"
    assert "trained" in (tmp_path / "study" / "report.md").read_text()


def test_bad_submissions_fail_before_anything_is_written(tmp_path: Path, capsys):
    out = tmp_path / "run"
    for args, message in ((["--time", "2h"], "--time '2h' is not a Slurm time limit"),
                          (["--nodes", "0"], "--nodes must be >= 1"),
                          (["--tasks-per-node", "3"], "train.batch_size (8) must be divisible by train.accum_steps (1) x ranks"),
                          (["--only", "x"], "--only selects a study's runs")):
        assert main(["submit", "--set", *RUN, f"out_dir={out}", *args]) == 2
        assert message in capsys.readouterr().err
    assert not out.exists()
    (out).mkdir()
    (out / LAST).write_bytes(b"")
    assert main(["submit", "--set", *RUN, f"out_dir={out}", "--dry-run"]) == 2
    assert "already holds a run; pass --resume" in capsys.readouterr().err
    assert not (out / "slurm").exists()


def test_dry_run_writes_a_script_that_gives_every_rank_its_variables(tmp_path: Path, capsys):
    out = tmp_path / "run"
    assert main(["submit", "--set", *RUN, f"out_dir={out}", "--nodes", "2", "--tasks-per-node", "2", "--time",
                 "1-00:00:00", "--partition", "gpu", "--dry-run"]) == 0
    script = (out / "slurm" / "pretrain.sbatch").read_text()
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=2", "#SBATCH --time=1-00:00:00",
                 "#SBATCH --partition=gpu", "#SBATCH --signal=USR1@120", "#SBATCH --requeue",
                 "RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS"):
        assert line in script
    assert (out / "slurm" / "config.toml").exists() and "not submitted: --dry-run" in capsys.readouterr().out
    subprocess.run(["bash", "-n", str(out / "slurm" / "pretrain.sbatch")], check=True)  # valid bash
