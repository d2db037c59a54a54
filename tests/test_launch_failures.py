"""Failed multi-process launches end in one line of ours (rank 0's), exit 2 from every worker, and no
traceback from isolocal's code: bad launch shapes are refused before any worker or process group starts,
and a non-finite loss, a corrupt data file or a resume with another stage count stop every rank cleanly.

Real launches with 2 gloo workers: `torchrun` (whose own failure summary, printed whenever a worker
exits non-zero, is not ours to change) and `isolocal pretrain --nproc 2` (which prints nothing of its own).
"""
from __future__ import annotations

import gzip
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import isolocal
from isolocal.cli import main
from isolocal.data.datasets import FASHION_MNIST_ROOT
from isolocal.io.checkpoint import pipeline_client_state
from isolocal.testing.launch import free_port

REPO = Path(isolocal.__file__).resolve().parents[1]
RUN = ["data.name=synthetic", "data.synthetic_size=64", "train.batch_size=16", "train.epochs=1", "train.log_every=1",
       "pipeline.timeout_s=60"]  # 4 steps
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
OUR_TRACEBACK = re.compile(r'File ".*/isolocal/')


def ours(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("isolocal ")]


def run(cmd: list[str]) -> tuple[int, str]:
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=300)
    return proc.returncode, proc.stdout


def torchrun(*args: str) -> tuple[int, str]:
    return run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                f"--master_port={free_port()}", "-m", "isolocal.cli", "pretrain", *args])


def test_a_bad_launch_shape_is_refused_before_any_worker_starts(tmp_path, capsys):
    cases = [("pipeline.stages=3", "the launch has 2 processes, not a multiple of pipeline.stages (3)"),
             ("pipeline.stages=5", "pipeline.stages must be between 1 and the model's 4 stages, got 5"),
             ("pipeline.micro_batches=3", "train.batch_size (16) must be divisible by pipeline.micro_batches (3)"),
             ("pipeline.schedule='sideways'", "pipeline.schedule must be one of"),
             ("pipeline.partition='random'", "pipeline.partition must be count or cost, got 'random'"),
             ("pipeline.timeout_s=0", "pipeline.timeout_s must be >= 1, got 0")]
    for override, message in cases:
        stages = [] if override.startswith("pipeline.stages") else ["pipeline.stages=2"]
        code = main(["pretrain", "--nproc", "2", "--set", *RUN, *stages, override, "--out", str(tmp_path / "run")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0], (override, err)
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory) -> tuple[Path, int, str]:
    """`pretrain --nproc 2` of a 2-stage pipeline whose loss is not finite by its third step, saving every step."""
    out = tmp_path_factory.mktemp("launch") / "run"
    code, output = run([sys.executable, "-m", "isolocal.cli", "pretrain", "--nproc", "2", "--pipeline-stages", "2",
                        "--set", *RUN, "train.base_lr=1e9", "train.ckpt_every_steps=1", "--out", str(out)])
    return out, code, output


@pytest.mark.slow
def test_a_non_finite_pipeline_loss_stops_every_rank_in_one_line_and_keeps_the_last_checkpoint(stopped_run):
    out, code, output = stopped_run
    assert code == 2, output[-3000:]
    lines = ours(output)
    assert len(lines) == 1 and lines[0].startswith("isolocal pretrain: error: non-finite values at step"), output
    assert "last good checkpoint" in lines[0] and "Traceback" not in output, output
    saved = pipeline_client_state(out / "pipeline")["step"]
    assert saved >= 1 and f"(step {saved})" in lines[0]


@pytest.mark.slow
def test_torchrun_resuming_with_another_stage_count_is_one_line_from_rank_0(stopped_run):
    out, _, _ = stopped_run
    code, output = torchrun("--set", *RUN, "train.base_lr=1e9", "train.ckpt_every_steps=1", "pipeline.stages=1",
                            "--out", str(out), "--resume")
    lines = ours(output)
    assert code != 0 and len(lines) == 1 and "cannot resume" in lines[0] and "pipeline.stages" in lines[0], output
    assert "exitcode  : 2" in output and not OUR_TRACEBACK.search(output), output  # torchrun's summary of our exit 2


@pytest.mark.slow
def test_torchrun_with_a_corrupt_data_file_is_one_line_from_rank_0(tmp_path):
    for name in os.listdir(FASHION_MNIST_ROOT):  # every file whole but the training images, cut short
        data = (Path(FASHION_MNIST_ROOT) / name).read_bytes()
        if name.startswith("train-images"):
            data = gzip.compress(gzip.decompress(data)[:10_000])
        (tmp_path / name).write_bytes(data)
    code, output = torchrun("--set", "data.name=fashion_mnist", f"data.root={tmp_path}", "train.batch_size=16",
                            "pipeline.stages=2", "--out", str(tmp_path / "run"))
    lines = ours(output)
    assert code != 0 and len(lines) == 1 and "train-images" in lines[0], output
    assert "exitcode  : 2" in output and not OUR_TRACEBACK.search(output), output
