"""Bad inputs and faults: each ends in one clear line (CLI: exit 2, or 130 for an interrupt) or a
ValueError / TypeError (API) that names the bad value, before any work; nothing good is lost."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

import isolocal
from isolocal.io.checkpoint import LAST, atomic_save, load_state
from isolocal.cli import main
from isolocal.errors import CheckpointError, CheckpointWriteError, NonFiniteError
from isolocal.train import Trainer, train

TINY = ["data.name=synthetic", "data.synthetic_size=48", "train.batch_size=8", "train.epochs=2",
        "train.log_every=1", "train.warmup_epochs=0.5"]  # nano preset: 6 steps per epoch


PROGRESS_LINE = re.compile(r": \d+/\d+ \S+ \(\d+%\)")  # `isolocal.core.progress` off a terminal


def run_cli(capsys, *argv: str) -> tuple[int, list[str]]:
    """(exit code, stderr lines without progress: bar redraws, or the plain lines printed off a terminal)."""
    code = main(list(argv))
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.strip() and "\r" not in line and "step/s" not in line
                  and not PROGRESS_LINE.search(line)]


def one_line(lines: list[str], *needles: str) -> str:
    assert len(lines) == 1, lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished 12-step run (epoch_0001.pt, epoch_0002.pt, last.pt)."""
    out = tmp_path_factory.mktemp("run")
    assert main(["pretrain", "--set", *TINY, "--out", str(out)]) == 0
    return out


# ------------------------------------------------------------------------- config, before any work

CONFIG_CASES = [
    ("train.base_lr=inf", "train.base_lr must be a finite number, got inf"),
    ("train.base_lr=nan", "train.base_lr must be a finite number, got nan"),
    ("train.betas=[0.9, nan]", "train.betas[1] must be a finite number"),
    ("model.embed_dim=-64", "model.embed_dim must be >= 1, got -64"),
    ("model.depth=0", "model.depth must be >= 1, got 0"),
    ("model.decoder_dim=[0]", "model.decoder_dim entries must be >= 1, got [0]"),
    ("model.decoder_heads=[0]", "model.decoder_heads entries must be >= 1, got [0]"),
    ("model.mlp_ratio=0", "model.mlp_ratio must be > 0, got 0.0"),
    ("model.drop_path_rate=5", "model.drop_path_rate must be in [0, 1), got 5.0"),
    ("model.mask_ratio=1.5", "model.mask_ratio must be in (0, 1), got 1.5"),
    ("model.target='rgb'", "model.target must be hog or pixels, got 'rgb'"),
    ("model.mask_unit=3", "mask_unit 3 must be >= 1 and divide the token grid 8"),
    ("train.ckpt_every_epochs=0", "train.ckpt_every_epochs must be >= 1, got 0"),
    ("train.ckpt_every_epochs=-1", "train.ckpt_every_epochs must be >= 1, got -1"),
    ("train.ckpt_every_steps=-1", "train.ckpt_every_steps must be >= 0 (0 = off), got -1"),
    ("train.ckpt_every_minutes=-1", "train.ckpt_every_minutes must be >= 0 (0 = off), got -1"),
    ("train.ckpt_every_minutes=inf", "train.ckpt_every_minutes must be a finite number, got inf"),
    ("train.nonfinite='maybe'", "train.nonfinite must be stop or skip, got 'maybe'"),
    ("train.nonfinite_max_skips=0", "train.nonfinite_max_skips must be >= 1, got 0"),
    ("train.stage_lr_scale=[1, 0, 1, 1]", "train.stage_lr_scale entries must be > 0"),
    ("data.num_workers=-1", "data.num_workers must be >= 0, got -1"),
    ("data.synthetic_size=0", "data.synthetic_size must be >= 1, got 0"),
    ("pipeline.timeout_s=0", "pipeline.timeout_s must be >= 1, got 0"),
]


@pytest.mark.parametrize("override, message", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_values_are_one_line_before_the_run_directory_exists(tmp_path, capsys, override, message):
    out = tmp_path / "run"
    code, lines = run_cli(capsys, "pretrain", "--set", *TINY, override, "--out", str(out))
    assert code == 2
    one_line(lines, "isolocal pretrain: error:", message)
    assert not out.exists()


# ---------------------------------------------------------------------------------------- the API

@pytest.fixture(scope="module", params=["pixels", "hog"])
def model(request):
    torch.manual_seed(0)
    return isolocal.create_model("localmim_vit_nano", target=request.param)


def _images(model, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, model.cfg.in_chans, model.img_size, model.img_size)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.float32])
def test_a_mask_that_is_not_bool_is_a_type_error_naming_its_dtype(model, dtype):
    mask = model.random_mask(2).to(dtype)
    with pytest.raises(TypeError, match=f"mask must be a bool tensor .*got {dtype}"):
        model(_images(model), mask)


@pytest.mark.parametrize("fill", [False, True], ids=["nothing-masked", "everything-masked"])
def test_a_mask_without_visible_or_masked_tokens_is_refused(model, fill):
    mask = torch.full((2, model.mask_grid ** 2), fill)
    with pytest.raises(ValueError, match="at least one visible .* and one masked"):
        model(_images(model), mask)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_images_are_refused_in_forward_and_encode(model, value):
    images = _images(model)
    images[1, 0, 3, 4] = value
    with pytest.raises(ValueError, match="images must be finite"):
        model(images, model.random_mask(2))
    with pytest.raises(ValueError, match="images must be finite"):
        model.encode(images)


@pytest.mark.parametrize("shape", [(0, 1, 32, 32), (1, 32, 32), (2, 1, 16, 16), (2, 3, 32, 32), (2, 1, 32, 48)])
def test_images_of_the_wrong_shape_name_the_expected_one(model, shape):
    images = torch.randn(*shape)
    with pytest.raises(ValueError, match=r"images must have shape \(batch >= 1, 1, 32, 32\), got " +
                       str(tuple(shape)).replace("(", r"\(").replace(")", r"\)")):
        model(images, model.random_mask(max(shape[0], 1)))
    with pytest.raises(ValueError, match="images must have shape"):
        model.encode(images)


def test_integer_images_and_a_mask_of_the_wrong_shape(model):
    with pytest.raises(TypeError, match="images must be a floating-point tensor, got torch.uint8"):
        model(_images(model).to(torch.uint8), model.random_mask(2))
    with pytest.raises(ValueError, match=r"mask must have shape \(2, 64\) \(batch, tokens\), got \(3, 64\)"):
        model(_images(model), model.random_mask(3))


# ------------------------------------------------------------------------------ checkpoint files

def _bad_file(tmp_path: Path, run_dir: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.pt"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes((run_dir / LAST).read_bytes()[:5000])
    elif kind == "random":
        path.write_bytes(os.urandom(4096))
    return path


BAD_FILES = {"empty": "is empty (0 bytes)", "truncated": "is unreadable: truncated",
             "random": "is unreadable: truncated"}


@pytest.mark.parametrize("kind", BAD_FILES)
@pytest.mark.parametrize("command", ["export", "eval", "init"])
def test_unreadable_checkpoints_are_one_line_naming_the_file(tmp_path, capsys, run_dir, kind, command):
    path = _bad_file(tmp_path, run_dir, kind)
    argv = {"export": ["export", "--ckpt", str(path), "--out", str(tmp_path / "x.pt")],
            "eval": ["eval", "knn", "--ckpt", str(path), "--set", "data.name=synthetic"],
            "init": ["pretrain", "--set", *TINY, "--init", str(path), "--out", str(tmp_path / "new")]}[command]
    code, lines = run_cli(capsys, *argv)
    assert code == 2
    one_line(lines, str(path), BAD_FILES[kind])


def test_analyze_refuses_an_unreadable_file_in_one_line(tmp_path, capsys, run_dir):
    path = _bad_file(tmp_path, run_dir, "truncated")
    code, lines = run_cli(capsys, "analyze", "nmi", "--ckpt", str(path), "--images", "synthetic:2",
                          "--out", str(tmp_path / "a"))
    assert code == 2
    one_line(lines, str(path))


def test_weights_that_do_not_fit_their_config_name_the_first_differing_key(tmp_path, capsys, run_dir):
    state = load_state(run_dir / LAST)
    key = "stages.0.patch_embed.proj.weight"
    state["model"][key] = torch.zeros(3, 3)
    path = atomic_save(state, tmp_path / "mismatch.pt")
    code, lines = run_cli(capsys, "export", "--ckpt", str(path), "--out", str(tmp_path / "x.pt"))
    assert code == 2
    one_line(lines, str(path), f"first difference at {key} (checkpoint: shape (3, 3), model: shape (")


@pytest.mark.parametrize("command", ["export", "eval"])
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, capsys, run_dir, command):
    state = load_state(run_dir / LAST)
    key = "stages.1.blocks.0.attn.qkv.weight"
    state["model"][key][0, 0] = float("nan")
    path = atomic_save(state, tmp_path / "nan.pt")
    argv = {"export": ["export", "--ckpt", str(path), "--out", str(tmp_path / "x.pt")],
            "eval": ["eval", "knn", "--ckpt", str(path), "--set", "data.name=synthetic"]}[command]
    code, lines = run_cli(capsys, *argv)
    assert code == 2
    one_line(lines, str(path), f"non-finite weights in {key}")
    assert not (tmp_path / "x.pt").exists()


def test_a_missing_checkpoint_is_one_line(tmp_path, capsys):
    code, lines = run_cli(capsys, "export", "--ckpt", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "x.pt"))
    assert code == 2
    one_line(lines, "nope.pt", "does not exist")


# --------------------------------------------------------------------------------- runs and faults

def _copy_run(run_dir: Path, dest: Path) -> Path:
    dest.mkdir()
    for p in run_dir.iterdir():
        if p.is_file():
            (dest / p.name).write_bytes(p.read_bytes())
    return dest


def test_resume_of_a_finished_run_says_so_with_its_real_final_loss(tmp_path, capsys, run_dir):
    out = _copy_run(run_dir, tmp_path / "done")
    last_step = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
                 if json.loads(line)["kind"] == "step"][-1]
    assert main(["pretrain", "--set", *TINY, "--out", str(out), "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "already finished: 12 steps, 2 epochs" in printed
    assert f"final loss {last_step['loss']:.4f}" in printed and last_step["loss"] > 0


def test_a_truncated_last_pt_falls_back_to_the_newest_intact_epoch_checkpoint(tmp_path, capsys, run_dir):
    out = _copy_run(run_dir, tmp_path / "broken")
    (out / "epoch_0002.pt").unlink()
    (out / LAST).write_bytes((out / LAST).read_bytes()[:5000])
    assert main(["pretrain", "--set", *TINY, "--out", str(out), "--resume"]) == 0
    err = capsys.readouterr().err
    assert f"checkpoint {out / LAST}" in err and "resuming from epoch_0001.pt (step 6) instead" in err
    assert load_state(out / LAST)["step"] == 12
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "step"]
    assert steps == list(range(12))  # the records past step 6 were redone, not duplicated


def test_a_truncated_last_pt_with_nothing_intact_beside_it_is_one_line(tmp_path, capsys, run_dir):
    out = _copy_run(run_dir, tmp_path / "lost")
    for name in ("epoch_0001.pt", "epoch_0002.pt"):
        (out / name).unlink()
    (out / LAST).write_bytes(b"")
    code, lines = run_cli(capsys, "pretrain", "--set", *TINY, "--out", str(out), "--resume")
    assert code == 2
    one_line(lines, f"checkpoint {out / LAST} is empty", "no intact epoch_NNNN.pt")


def test_a_stale_temp_file_is_removed_at_start(tmp_path, capsys, run_dir):
    out = _copy_run(run_dir, tmp_path / "stale")
    stale = out / ".epoch_0003.pt.k2j3h4.tmp"
    stale.write_bytes(os.urandom(5000))
    (out / "keep.tmp").write_bytes(b"not ours")
    train_cfg = ["pretrain", "--set", *TINY, "train.epochs=3", "--out", str(out), "--resume"]
    assert main(train_cfg) == 0
    assert f"removed {stale.name}" in capsys.readouterr().err
    assert not stale.exists() and (out / "keep.tmp").exists()


def test_disk_full_is_one_line_and_the_old_checkpoint_stays(tmp_path, monkeypatch, run_dir):
    out = _copy_run(run_dir, tmp_path / "full")
    before = (out / LAST).read_bytes()

    def full(obj, f):
        f.write(b"x" * 1000)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(CheckpointWriteError) as err:
        atomic_save({"w": torch.zeros(3)}, out / LAST)
    assert str(err.value).count("\n") == 0 and "No space left on device" in str(err.value)
    assert str(out / LAST) in str(err.value) and "intact" in str(err.value)
    assert (out / LAST).read_bytes() == before
    assert not list(out.glob(".*.tmp"))


def test_a_nan_run_stops_at_its_first_bad_step_and_keeps_the_last_good_checkpoint(tmp_path):
    """Stage 2's decoder goes NaN before step 7 (isolated: only its loss and gradient are hit); the
    guard is read at log steps (every 4): the run stops at step 8 naming step 7, epoch 1's checkpoint stays."""
    cfg = isolocal.config.load.load_run_config(None, [*TINY, "train.log_every=4", "model.boundary='isolated'"])
    cfg.out_dir = str(tmp_path / "nan")
    calls = []

    def poison(images, mask):
        calls.append(1)
        if len(calls) == 8:
            with torch.no_grad():
                trainer.model.stages[2].decoder.mask_token.fill_(float("nan"))

    trainer = Trainer(cfg, on_batch=poison)
    with pytest.raises(NonFiniteError) as err:
        trainer.fit()
    trainer.close()
    assert str(err.value).startswith("non-finite values at step 7 (0-based): loss of stage(s) 2; gradient of "
                                     "stage(s) 2; training stopped and the last good checkpoint (step 6) is kept")
    assert load_state(tmp_path / "nan" / LAST)["step"] == 6
    assert sorted(p.name for p in (tmp_path / "nan").glob("*.pt")) == ["epoch_0001.pt", LAST]
    steps = [json.loads(line)["step"] for line in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "step"]
    assert steps == [0, 4]  # no record of a bad step is written


def test_a_run_that_is_nan_from_its_start_is_one_line_and_writes_no_checkpoint(tmp_path, capsys):
    out = tmp_path / "nan0"
    code, lines = run_cli(capsys, "pretrain", "--set", *TINY, "train.base_lr=1e30", "train.log_every=3",
                          "--out", str(out))
    assert code == 2
    one_line(lines, "non-finite values at step", "no checkpoint was written")
    assert not list(out.glob("*.pt"))


def test_skip_drops_bad_updates_counts_them_and_stops_after_the_limit(tmp_path):
    cfg = isolocal.config.load.load_run_config(None, [*TINY, "train.base_lr=1e30", "train.nonfinite='skip'",
                                                  "train.nonfinite_max_skips=3"])
    cfg.out_dir = str(tmp_path / "skip")
    with pytest.raises(NonFiniteError, match="in 3 consecutive steps .*nonfinite_max_skips"):
        train(cfg)
    records = [json.loads(line) for line in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    counts = [r["skipped_steps"] for r in records if r["kind"] == "step"]
    assert counts == sorted(counts) and counts[-1] == 2  # the third skip in a row stops before its record
    assert not list((tmp_path / "skip").glob("*.pt"))


def test_a_corrupt_image_in_a_worker_is_the_same_one_line_as_without_workers(tmp_path, capsys):
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / "img" / cls).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (40, 40), (i * 40, 0, 0)).save(tmp_path / "img" / cls / f"{i}.png")
    (tmp_path / "img" / "a" / "bad.png").write_bytes(b"not a png")  # 9 images: every batch of 8 ...
    (tmp_path / "img" / "b" / "0.png").unlink()  # ... of the 8 left holds it
    lines = {}
    for workers in (0, 1):
        code, lines[workers] = run_cli(capsys, "pretrain", "--set", *TINY, "data.name='folder'",
                                       f"data.root='{tmp_path / 'img'}'", f"data.num_workers={workers}",
                                       "--out", str(tmp_path / f"run{workers}"))
        assert code == 2
        one_line(lines[workers], "cannot read image", "bad.png")
    assert lines[0] == lines[1]


def test_checkpoint_error_is_a_value_error_so_every_command_prints_it_in_one_line():
    assert issubclass(CheckpointError, ValueError) and issubclass(NonFiniteError, ValueError)
