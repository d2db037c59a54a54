"""Failures of a single run: outputs that cannot be written, checkpoints of the wrong kind, API entry
checks, and the inputs that used to give a number with exit 0. Each ends in one line (CLI: exit 2) or one
ValueError / ConfigError before any work, and leaves every file that was there as it was."""
from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_failures import TINY, one_line, run_cli

import analysis
import isolocal
from isolocal.cli import main
from isolocal.config import ConfigError
from isolocal.heads import StagePlan
from isolocal.io.checkpoint import LAST, atomic_save, load_state

SMALL = [*TINY, "train.epochs=1", "data.synthetic_size=16"]  # 2 steps
EVAL = ["data.name=synthetic", "data.synthetic_size=48", "eval.train_subset=32", "eval.test_subset=16"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished 2-step localmim_vit_nano run."""
    out = tmp_path_factory.mktemp("vit") / "run"
    assert main(["pretrain", "--set", *SMALL, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def resnet_dir(tmp_path_factory) -> Path:
    """A finished 1-step resnet32_k2 run (classify heads), cut to depths [1, 1, 2] for speed."""
    out = tmp_path_factory.mktemp("resnet") / "run"
    assert main(["pretrain", "--set", *SMALL, "preset='resnet32_k2'", "model.depths=[1, 1, 2]", "model.taps=[1, 3]",
                 "train.max_steps=1", "--out", str(out)]) == 0
    return out


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under `directory`, by relative path: what must be unchanged after a refused command."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def copy_run(run_dir: Path, dest: Path) -> Path:
    shutil.copytree(run_dir, dest)
    return dest


@contextmanager
def unwritable(directory: Path) -> Iterator[None]:
    """`directory` made unwritable for real: chmod 555, or as root (whom chmod does not stop) the immutable
    attribute (chattr +i), which stops root too; skipped where neither stops a write."""
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(directory)], capture_output=True).returncode:
            pytest.skip("running as root, which chmod does not stop, and chattr +i is unavailable on this file system")
        undo = lambda: subprocess.run(["chattr", "-i", str(directory)], check=True)  # noqa: E731
    else:
        directory.chmod(0o555)
        undo = lambda: directory.chmod(0o755)  # noqa: E731
    try:
        with pytest.raises(OSError):
            (directory / "probe").write_bytes(b"")
        yield
    finally:
        undo()


def _commands(run_dir: Path, out: Path) -> dict[str, list[str]]:
    """Each command that writes, with its output at `out`."""
    return {
        "pretrain": ["pretrain", "--set", *SMALL, "--out", str(out)],
        "eval": ["eval", "knn", "--ckpt", str(run_dir), "--set", *EVAL, "--out", str(out / "knn.json")],
        "export": ["export", "--ckpt", str(run_dir), "--out", str(out / "vit.pt")],
        "analyze": ["analyze", "nmi", "--ckpt", str(run_dir / LAST), "--images", "synthetic:2", "--out", str(out)],
    }


# ------------------------------------------------------------------------- outputs that cannot be written

@pytest.mark.parametrize("command", ["pretrain", "eval", "export", "analyze"])
def test_an_output_below_a_regular_file_is_one_line_naming_the_file(tmp_path, capsys, run_dir, command):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("mine\n")
    before = snapshot(run_dir)
    code, lines = run_cli(capsys, *_commands(run_dir, blocker / "sub")[command])
    assert code == 2
    one_line(lines, f"isolocal {command}: error: cannot write the", str(blocker / "sub"),
             f"{blocker} is a file, not a directory")
    assert blocker.read_text() == "mine\n" and snapshot(run_dir) == before


@pytest.mark.parametrize("command", ["pretrain", "eval", "export", "analyze"])
def test_an_output_in_a_read_only_directory_is_one_line_naming_it(tmp_path, capsys, run_dir, command):
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "old.txt").write_text("kept\n")
    with unwritable(locked):
        code, lines = run_cli(capsys, *_commands(run_dir, locked / "new")[command])
    assert code == 2
    one_line(lines, f"isolocal {command}: error: cannot write the", str(locked / "new"))
    assert snapshot(locked) == {"old.txt": b"kept\n"}


def test_resume_of_a_run_directory_that_became_read_only_is_one_line_and_loses_nothing(tmp_path, capsys, run_dir):
    out = copy_run(run_dir, tmp_path / "run")
    before = snapshot(out)
    with unwritable(out):
        code, lines = run_cli(capsys, "pretrain", "--set", *SMALL, "train.epochs=2", "--out", str(out), "--resume")
    assert code == 2
    one_line(lines, "isolocal pretrain: error: cannot write the run directory (out_dir)", str(out))
    assert snapshot(out) == before


def test_eval_out_naming_a_directory_is_refused_before_evaluating(tmp_path, capsys, run_dir):
    code, lines = run_cli(capsys, "eval", "knn", "--ckpt", str(run_dir), "--set", *EVAL, "--out", str(tmp_path))
    assert code == 2
    one_line(lines, f"the --out file {tmp_path} is a directory")


# ----------------------------------------------------------------------------- checkpoints of another kind

def test_resume_from_a_checkpoint_without_a_config_names_what_it_holds(tmp_path, capsys, run_dir):
    """With no intact epoch_NNNN.pt beside it to fall back on (as a truncated last.pt does)."""
    out = copy_run(run_dir, tmp_path / "run")
    state = load_state(out / LAST)
    del state["config"]
    atomic_save(state, out / LAST)
    for path in out.glob("epoch_*.pt"):
        path.unlink()
    before = snapshot(out)
    code, lines = run_cli(capsys, "pretrain", "--set", *SMALL, "train.epochs=2", "--out", str(out), "--resume")
    assert code == 2
    one_line(lines, f"{out / LAST} holds a dict with keys '", "not the state of an isolocal run",
             "no intact epoch_NNNN.pt beside it")
    assert snapshot(out) == before


def test_resume_from_a_timm_export_says_it_is_a_bare_state_dict(tmp_path, capsys, run_dir):
    out = tmp_path / "run"
    out.mkdir()
    assert main(["export", "--ckpt", str(run_dir), "--out", str(out / LAST)]) == 0
    capsys.readouterr()
    code, lines = run_cli(capsys, "pretrain", "--set", *SMALL, "--out", str(out), "--resume")
    assert code == 2
    one_line(lines, "holds a bare state dict of", "not the state of an isolocal run")


def test_init_from_a_resnet_checkpoint_in_a_vit_run_is_one_line(tmp_path, capsys, resnet_dir):
    out = tmp_path / "vit"
    code, lines = run_cli(capsys, "pretrain", "--set", *SMALL, "--init", str(resnet_dir), "--out", str(out))
    assert code == 2
    one_line(lines, f"checkpoint {resnet_dir} holds a resnet model (preset resnet32_k2)",
             "describes a vit model")
    assert not list(out.glob("*.pt"))


def test_init_from_a_vit_of_another_width_names_the_first_differing_key(tmp_path, capsys, run_dir):
    code, lines = run_cli(capsys, "pretrain", "--set", *SMALL, "model.embed_dim=96", "--init", str(run_dir),
                          "--out", str(tmp_path / "wide"))
    assert code == 2
    one_line(lines, "does not fit the model this run's config describes: first difference at")


# ------------------------------------------------------------------------------------- the API entry

@pytest.mark.parametrize("overrides, message", [
    ({"mlp_ratio": 0}, "model.mlp_ratio must be > 0, got 0"),
    ({"drop_path_rate": 5}, r"model.drop_path_rate must be in \[0, 1\), got 5"),
    ({"objective": "contrastive", "temperature": 0}, "model.temperature must be > 0, got 0"),
    ({"objective": "contrastive", "temperature": -0.5}, "model.temperature must be > 0, got -0.5"),
    ({"objective": "classify", "num_classes": 1}, "model.num_classes must be >= 2, got 1"),
])
def test_create_model_refuses_what_the_config_refuses(overrides, message):
    with pytest.raises(ConfigError, match=message):
        isolocal.create_model("localmim_vit_nano", **overrides)
    cfg = isolocal.preset_config("localmim_vit_nano")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    with pytest.raises(ConfigError, match=message):
        isolocal.StagewiseEncoder(cfg)


def _softmax_attention(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0)).softmax(-1)


@pytest.mark.parametrize("metric", ["nmi", "attention_distance"])
def test_attention_metrics_refuse_a_map_without_its_image_axis_or_not_a_softmax(metric):
    measure = {"nmi": analysis.nmi,
               "attention_distance": lambda a: analysis.attention_distance(a, (3, 3), 8)}[metric]
    with pytest.raises(ValueError, match=r"must have shape \(images, heads, tokens, tokens\), got \(3, 10, 10\)"):
        measure(_softmax_attention(3, 10, 10))
    with pytest.raises(ValueError, match="must be non-negative"):
        measure(_softmax_attention(2, 3, 10, 10) - 0.05)
    with pytest.raises(ValueError, match="rows must sum to 1"):
        measure(_softmax_attention(2, 3, 10, 10) * 2)
    assert measure(_softmax_attention(2, 3, 10, 10)).shape == (3,)


# -------------------------------------------------------------------------- no more silent wrong results

def test_an_image_folder_with_train_and_no_val_is_refused_naming_the_split(tmp_path, capsys, run_dir):
    for cls in ("a", "b"):
        (tmp_path / "img" / "train" / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40, 40), (i * 60, 0, 0)).save(tmp_path / "img" / "train" / cls / f"{i}.png")
    code, lines = run_cli(capsys, "eval", "knn", "--ckpt", str(run_dir), "--set", "data.name='folder'",
                          f"data.root='{tmp_path / 'img'}'")
    assert code == 2
    one_line(lines, f"image folder {tmp_path / 'img'} has train/ but no val/", "the val split is missing")


def test_eval_head_on_a_model_without_classify_heads_is_an_error(capsys, run_dir):
    code, lines = run_cli(capsys, "eval", "head", "--ckpt", str(run_dir), "--set", *EVAL)
    assert code == 2
    one_line(lines, "eval head reads the model's own classify heads", "has none (its stages' objectives: mim")


def test_eval_head_reports_every_classify_head(capsys, resnet_dir):
    assert main(["eval", "head", "--ckpt", str(resnet_dir), "--set", *EVAL, "eval.feature='mean'"]) == 0
    assert "head_top1" in capsys.readouterr().out


@pytest.mark.parametrize("overrides, message", [
    (["model.objective='contrastive'", "train.batch_size=1"],
     "takes each image's negatives from the other images of its micro-batch, and a micro-batch here holds 1"),
    (["model.objective='contrastive'", "train.batch_size=4", "train.accum_steps=4"], "holds 1"),
    (["model.objective='classify'", "model.num_classes=1"], "model.num_classes must be >= 2, got 1"),
])
def test_a_head_that_cannot_learn_is_refused_before_training(tmp_path, capsys, overrides, message):
    out = tmp_path / "run"
    code, lines = run_cli(capsys, "pretrain", "--set", *SMALL, *overrides, "--out", str(out))
    assert code == 2
    one_line(lines, message)
    assert not list(out.glob("*.pt"))


def test_a_micro_batch_of_two_can_contrast():
    plan = isolocal.preset_config("localmim_vit_nano")
    plan.objective = "contrastive"
    plan = StagePlan.from_config(plan)
    plan.check_micro_batch(2, "two images")
    with pytest.raises(ConfigError, match="a micro-batch here holds 1 \\(one image\\)"):
        plan.check_micro_batch(1, "one image")


def test_a_diverging_linear_probe_fails_naming_its_stage_and_lr(tmp_path, capsys, run_dir):
    out = tmp_path / "linear.json"
    code, lines = run_cli(capsys, "eval", "linear", "--ckpt", str(run_dir), "--set", *EVAL, "eval.linear_lr=1e9",
                          "eval.linear_epochs=2", "--out", str(out))
    assert code == 2
    one_line([line for line in lines if "it/s]" not in line], "linear probe stage", "diverged", "mean loss",
             "lower eval.linear_lr (1e+09)")
    assert not out.exists()
