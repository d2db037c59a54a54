"""The run layer: one loop for both runners, one checkpoint module, a pinned DeepSpeed,
TensorBoard logs, and pipeline ranks that compute only their own stages' targets.

The pipeline checks share one real 2-rank DeepSpeed launch (gloo, CPU): this file, run as a script,
is the worker of each rank (`python tests/test_run_layer.py OUT CONFIG_JSON`).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TINY = ["data.name=synthetic", "data.synthetic_size=64", "train.batch_size=16", "train.log_every=1",
        "train.warmup_epochs=0.5", "model.boundary=isolated"]  # nano preset: 4 stages, 32 px gray


def _env(**extra: str) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), **extra}


# ------------------------------------------------------------------------------ DeepSpeed range

def test_deepspeed_outside_the_tested_range_is_one_line_naming_the_range(tmp_path):
    """A DeepSpeed 0.15 install (its metadata first on the path) makes the pipeline refuse to load."""
    from isolocal.train.pipeline import DEEPSPEED_RANGE

    info = tmp_path / "deepspeed-0.15.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: deepspeed\nVersion: 0.15.0\n")
    env = _env(PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO)]), WORLD_SIZE="2", LOCAL_RANK="0")
    out = subprocess.run([sys.executable, "-m", "isolocal", "pretrain", "--pipeline-stages", "2", "--set", *TINY,
                          f"out_dir={tmp_path / 'run'}"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.splitlines() == [f"isolocal pretrain: error: isolocal.train.pipeline needs deepspeed "
                                       f"{DEEPSPEED_RANGE} (the tested range), found 0.15.0; install a version "
                                       "in that range"]


# ------------------------------------------------------------------------------ single process

def tiny(out: Path, *overrides: str):
    from isolocal.config.load import load_run_config

    cfg = load_run_config(None, [*TINY, "train.epochs=2", *overrides])
    cfg.out_dir = str(out)
    return cfg


def tensorboard_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def assert_tensorboard_matches_the_log(run_dir: Path, stages: int) -> None:
    scalars = tensorboard_scalars(run_dir)
    for kind in ("step", "epoch"):
        logged = records(run_dir, kind)
        assert logged
        for k in range(stages):
            expected = [(r["step"], r["loss_stage"][k]) for r in logged]
            got = scalars[f"{kind}/loss_stage/{k}"]
            assert [s for s, _ in got] == [s for s, _ in expected]
            assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-6)  # stored as float32
    for tag in ("step/lr", "step/img_per_s", "step/peak_mem_mb", "step/grad_norm_stage/0", "step/lr_stage/3"):
        assert len(scalars[tag]) == len(records(run_dir, "step")), tag


def test_trainer_tensorboard_holds_the_per_stage_losses_and_a_resume_rewrites_no_step(tmp_path):
    from isolocal.train import train

    train(tiny(tmp_path, "train.tensorboard=true", "train.max_steps=3"))
    train(tiny(tmp_path, "train.tensorboard=true"), resume=True)
    assert_tensorboard_matches_the_log(tmp_path, stages=4)
    assert [s for s, _ in tensorboard_scalars(tmp_path)["step/loss"]] == list(range(8))


def test_resume_refuses_a_checkpoint_without_the_loops_per_rank_state(tmp_path):
    from isolocal.io.checkpoint import LAST, atomic_save, load_state
    from isolocal.train import Trainer, train

    train(tiny(tmp_path, "train.max_steps=1"))
    old = {k: v for k, v in load_state(tmp_path / LAST).items() if k != "ranks"}  # as written before the loop
    atomic_save(old, tmp_path / LAST)
    with pytest.raises(ValueError, match="predates the per-rank run state .* with --init"):
        Trainer(tiny(tmp_path), resume=True)


def test_init_starts_a_single_process_run_from_a_checkpoints_weights(tmp_path):
    from isolocal.io.checkpoint import load_model_state
    from isolocal.train import Trainer, train

    train(tiny(tmp_path / "a", "train.max_steps=2"))
    trainer = Trainer(tiny(tmp_path / "b", "train.seed=1"), init=str(tmp_path / "a"))  # a run directory
    try:
        saved = load_model_state(tmp_path / "a")[1]
        assert all(torch.equal(v, saved[k]) for k, v in trainer.model.state_dict().items())
    finally:
        trainer.close()


# ------------------------------------------------------------------------------ a 2-rank pipeline

def worker(out: Path, cfg_dict: dict) -> None:
    """One rank: a pipeline run recording, per call of the model's target bank, which targets it made."""
    from isolocal.config import RunConfig, from_dict
    from isolocal.train.pipeline.runner import PipelineRun, exit_on_failure, shutdown

    made: list[list[int]] = []
    with exit_on_failure():
        run = PipelineRun(from_dict(RunConfig, cfg_dict))
        run.model.target_bank.register_forward_hook(
            lambda module, args, targets: made.append([k for k, t in enumerate(targets) if t is not None]))
        run.fit()
        run.close()
        (out / f"targets_rank{run.dist.rank}.json").write_text(json.dumps({"stages": run.pipe.stage_ids,
                                                                           "made": made}))
        shutdown()


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory) -> Path:
    """A finished 2-rank isolated pipeline run with TensorBoard logs; returns its run directory."""
    from isolocal.config import to_dict

    sys.path.insert(0, str(Path(__file__).parent))
    from test_pipeline import free_port, wait_all

    out = tmp_path_factory.mktemp("pipe")
    cfg = tiny(out / "run", "train.epochs=1", "train.tensorboard=true", "pipeline.stages=2",
               "pipeline.micro_batches=2", "pipeline.timeout_s=60")
    port, procs = free_port(), []
    for rank in range(2):
        env = _env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
        log = open(out / f"log_rank{rank}.txt", "w")
        procs.append(subprocess.Popen([sys.executable, __file__, str(out), json.dumps(to_dict(cfg))], env=env,
                                      stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    codes = wait_all(procs, timeout=240)
    logs = "\n".join((out / f"log_rank{r}.txt").read_text()[-3000:] for r in range(2))
    assert codes == [0, 0], logs
    return out / "run"


@pytest.mark.slow
def test_a_pipeline_rank_computes_only_its_own_stages_targets(pipeline_run):
    for rank, own in enumerate(([0, 1], [2, 3])):
        seen = json.loads((pipeline_run.parent / f"targets_rank{rank}.json").read_text())
        assert seen["stages"] == own
        assert len(seen["made"]) == 4 * 2 + 2  # 4 steps x 2 micro-batches, then the 2 eval micro-batches
        assert all(made == own for made in seen["made"])


@pytest.mark.slow
def test_pipeline_tensorboard_holds_the_per_stage_losses(pipeline_run):
    assert_tensorboard_matches_the_log(pipeline_run, stages=4)
    assert tensorboard_scalars(pipeline_run)["eval/loss"][0][1] == pytest.approx(records(pipeline_run, "eval")[0]["loss"],
                                                                                 rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("change", ["train.seed=1", "train.batch_size=32"])
def test_pipeline_resume_with_another_batch_size_or_seed_is_refused_in_one_line(pipeline_run, change):
    key, value = change.split("=")
    env = _env(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0")  # refused before any process group or DeepSpeed import
    out = subprocess.run([sys.executable, "-m", "isolocal", "pretrain", "-c", str(pipeline_run / "config.toml"),
                          "--resume", "--set", change], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    before = {"train.seed": 0, "train.batch_size": 16}[key]
    assert out.stderr.splitlines() == [f"isolocal pretrain: error: cannot resume: the config differs from the "
                                       f"checkpoint's in {key} (checkpoint: {before}; this run: {value})"]


@pytest.mark.slow
@pytest.mark.parametrize("where", ["run directory", "pipeline directory"])
def test_eval_export_and_analyze_accept_a_pipeline_run(pipeline_run, where, tmp_path, capsys):
    import timm

    import isolocal
    from isolocal.cli import main

    ckpt = str(pipeline_run if where == "run directory" else pipeline_run / "pipeline")
    data = ["--set", "data.name=synthetic", "data.synthetic_size=64", "preset=localmim_vit_nano",
            "eval.train_subset=32", "eval.test_subset=16", "eval.knn_k=3", "eval.feature=mean"]
    assert main(["eval", "knn", "--ckpt", ckpt, *data, "--out", str(tmp_path / "eval.json")]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert [row["stage"] for row in result["results"]] == [0, 1, 2, 3]
    assert all(0 <= row["knn_top1"] <= 100 for row in result["results"])

    assert main(["export", "--ckpt", ckpt, "--out", str(tmp_path / "enc.pt")]) == 0
    meta = json.loads((tmp_path / "enc.json").read_text())
    vit = timm.create_model(meta["timm_model"], pretrained=False, **meta["kwargs"]).eval()
    vit.load_state_dict(torch.load(tmp_path / "enc.pt", weights_only=True))
    model = isolocal.load_checkpoint(ckpt)
    images = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(vit.forward_features(images), model.encode(images)[-1], atol=1e-5)

    assert main(["analyze", "nmi", "--ckpt", ckpt, "--label", "pipe", "--images", "fmnist:0,1",
                 "--out", str(tmp_path / "analysis")]) == 0
    import pandas as pd

    nmi = pd.read_csv(tmp_path / "analysis" / "nmi.csv")
    assert nmi.layer.tolist() == [1, 2, 3, 4] and nmi["pipe"].between(0, 1).all()
    capsys.readouterr()


if __name__ == "__main__":
    worker(Path(sys.argv[1]), json.loads(sys.argv[2]))
