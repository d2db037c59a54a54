"""`isolocal pretrain | export | info`: runs end to end, and bad configs fail with one line and exit 2."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import isolocal
from isolocal.cli import main
from isolocal.config.load import load_run_config

REPO = Path(isolocal.__file__).resolve().parents[1]
TINY = ["data.name=synthetic", "data.synthetic_size=32", "train.batch_size=8", "train.max_steps=2"]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_pretrain_writes_logs_config_and_checkpoint(tmp_path, capsys):
    code, out, _ = run_cli(capsys, "pretrain", "--set", *TINY, "model.boundary=isolated", "--out", str(tmp_path))
    assert code == 0 and "isolated run: 2 steps" in out
    steps = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps] == [0, 1]  # log_every 10: step 0, and the run's last step
    assert {"loss", "loss_stage", "lr", "grad_norm_stage", "img_per_s", "peak_mem_mb", "time"} <= steps[0].keys()
    assert len(steps[0]["loss_stage"]) == 4 and len(steps[0]["grad_norm_stage"]) == 4
    assert (tmp_path / "last.pt").is_file()
    assert load_run_config(tmp_path / "config.toml").model.boundary == "isolated"
    code, out, _ = run_cli(capsys, "pretrain", "-c", str(tmp_path / "config.toml"), "--set", "train.max_steps=3",
                           "--resume")
    assert code == 0 and "3 steps" in out


@pytest.mark.parametrize("measure", [[], ["--measure", "--repeats", "1"]], ids=["counted", "measured"])
def test_info_prints_one_row_per_stage(capsys, measure):
    code, out, _ = run_cli(capsys, "info", "--set", "preset=localmim_vit_nano", *measure)
    assert code == 0
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:3] == ["stage", "tap", "blocks"])
    assert lines[header].split()[-1] == ("fwd_ms" if measure else "out_bytes")  # timed only with --measure
    rows = [line.split() for line in lines[header + 1:header + 5]]
    assert [r[:3] for r in rows] == [["0", "0", "1"], ["1", "1", "1"], ["2", "2", "1"], ["3", "3", "1"]]
    gflops = [float(r[7]) for r in rows]
    assert all(g > 0 for g in gflops)
    assert "total: 459,940 parameters" in out


BAD = [
    (["--set", "train.epoch=3"], "unknown config key train.epoch"),
    (["--set", "train.epochs=three"], "train.epochs: 'three' has the wrong type"),
    (["--set", "train.base_lr=-1e-3"], "train.base_lr must be > 0"),
    (["--set", "train.batch_size=10", "train.accum_steps=3"], "train.batch_size (10) must be divisible by train.accum_steps (3)"),
    (["--set", "data.root=/nonexistent/fashion-mnist"], "/nonexistent/fashion-mnist does not exist"),
    (["--set", "model.taps=[0, 1]"], "scales must have one entry per tap"),
    (["-c", "/nonexistent/run.toml"], "config file /nonexistent/run.toml does not exist"),
    (["--resume"], "no checkpoint at"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[m.split()[0] for _, m in BAD])
def test_bad_config_is_one_clear_line_and_exit_2(tmp_path, capsys, args, message):
    code, out, err = run_cli(capsys, "pretrain", *args, "--out", str(tmp_path / "run"))
    assert code == 2
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # failed before any training


def test_unknown_key_in_a_toml_file_is_named(tmp_path, capsys):
    path = tmp_path / "run.toml"
    path.write_text('preset = "localmim_vit_nano"\n[train]\nepochs = 1\nlearning_rate = 0.1\n')
    code, _, err = run_cli(capsys, "pretrain", "-c", str(path), "--out", str(tmp_path / "run"))
    assert code == 2 and "unknown config key train.learning_rate" in err


def test_bad_config_from_the_shell_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "isolocal.cli", "pretrain", "--set", "train.batch_size=-4",
                           "--out", str(tmp_path)], capture_output=True, text=True, cwd=REPO, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2
    assert proc.stderr.strip() == "isolocal pretrain: error: train.batch_size must be >= 1, got -4"


@pytest.mark.parametrize("argv", [["--help"], ["pretrain", "--set", "train.batch_size=-4"],
                                  ["eval", "knn", "--ckpt", "random", "--set", "eval.knn_k=0"],
                                  ["info", "--set", "model.depth=0"]])
def test_help_and_config_errors_do_not_import_torch(argv):
    """`isolocal --help` and a bad `--set` answer without importing torch (or timm, matplotlib, pandas)."""
    code = ("import sys\nfrom isolocal.cli import main\ntry:\n    code = main(sys.argv[1:])\nexcept SystemExit as e:\n"
            "    code = e.code\nheavy = [m for m in ('torch', 'timm', 'matplotlib', 'pandas') if m in sys.modules]\n"
            "print('EXIT', code, 'HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=60)
    assert out.stdout.splitlines()[-1] == f"EXIT {0 if argv == ['--help'] else 2} HEAVY []", out.stdout + out.stderr
    if argv != ["--help"]:
        assert out.stderr.count("\n") == 1 and "error:" in out.stderr
