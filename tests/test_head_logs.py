"""A head's logs (`HeadOutput.logs`) reach `metrics.jsonl` per stage (`log_<key>_stage`, the mean over a
step's micro-batches and processes) and a study's summary (`log_<key>`, per stage); a model whose heads
need no mask runs without one."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import isolocal
from isolocal.config.load import load_run_config
from isolocal.heads import HeadInputs, HeadOutput, StageHead, pool, register_head
from isolocal.study.job import ANALYSIS, PRETRAIN, RUN_SPEC
from isolocal.study.schema import Run, metric_info
from isolocal.study.summary import run_rows
from isolocal.train import train
from isolocal.train.logs import HeadLogs, head_log_fields

NANO = "localmim_vit_nano"
TINY = ["data.name=synthetic", "data.synthetic_size=16", "train.batch_size=8", "train.accum_steps=2",
        "train.log_every=1", "train.max_steps=2"]


pytestmark = pytest.mark.usefixtures("own_head_registry")  # tests register heads of their own


class Counting(StageHead):
    """Logs the images it saw (a float) and its width (a tensor): values a test knows in advance."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = torch.nn.Linear(dim, 2)

    def loss(self, features: torch.Tensor, inputs: HeadInputs) -> HeadOutput:
        z = self.proj(pool(features, inputs.prefix))
        return HeadOutput(z.pow(2).mean(), z, {"images": float(features.shape[0]),
                                               "width": torch.tensor(features.shape[-1], dtype=torch.float32)})


def register_counting() -> None:
    register_head("counting", set(), lambda cfg, dim: Counting(dim))


# ---------------------------------------------------------------------------------------- the accumulator

def test_head_logs_average_over_calls_per_stage_and_refuse_what_is_not_one_named_number():
    logs = HeadLogs()
    logs.add(1, {"acc": torch.tensor(0.5), "n": 4})
    logs.add(1, {"acc": torch.tensor([0.25])})
    logs.add(3, {"acc": 1.0})
    assert logs.read() == {"acc": {1: 0.375, 3: 1.0}, "n": {1: 4.0}}
    with pytest.raises(ValueError, match=r"stage 2's head logged 'acc' of shape \(2,\): a log is one number"):
        logs.add(2, {"acc": torch.ones(2)})
    with pytest.raises(ValueError, match=r"stage 2's head logged 'top-1': a log's name holds only letters"):
        logs.add(2, {"top-1": 1.0})
    logs.clear()
    assert logs.read() == {}


def test_ranks_logs_become_one_list_per_key_with_none_where_a_stage_has_none():
    ranks = [{"acc": {1: 0.5, 3: 1.0}}, {"acc": {1: 0.25, 3: 0.0}, "n": {0: 2.0}}]
    assert head_log_fields(ranks, 4) == {"log_acc_stage": [None, 0.375, None, 0.5],
                                         "log_n_stage": [2.0, None, None, None]}


# ---------------------------------------------------------------------------------------- through training

@pytest.mark.parametrize("boundary", ["global", "isolated"])
def test_training_logs_each_stages_head_logs_in_its_step_records(tmp_path, boundary):
    """Global (one backward) and isolated (stage-wise backward): micro-batches of 4 images (8 over 2
    accumulation steps) give `images` 4.0 at each counting stage, null at the others; classify's `acc`
    is a fraction at its own stage; epoch records carry no head logs."""
    register_counting()
    run = load_run_config(None, [*TINY, f"model.boundary={boundary!r}", f"out_dir={str(tmp_path)!r}",
                                 "model.objective=['counting', 'mim', 'counting', 'classify']"])
    train(run)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    assert len(steps) == 2
    for record in steps:
        assert record["log_images_stage"] == [4.0, None, 4.0, None]
        assert record["log_width_stage"] == [64.0, None, 64.0, None]
        acc = record["log_acc_stage"]
        assert acc[:3] == [None] * 3 and 0.0 <= acc[3] <= 1.0 and acc[3] * 8 == round(acc[3] * 8)
    assert not any(key.startswith("log_") for r in records if r["kind"] != "step" for key in r)
    frame = pd.read_json(tmp_path / "metrics.jsonl", lines=True).query("kind == 'step'")
    assert frame["log_images_stage"].tolist() == [[4.0, None, 4.0, None]] * 2


def test_a_mim_run_logs_nothing_more(tmp_path):
    train(load_run_config(None, [*TINY, f"out_dir={str(tmp_path)!r}"]))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert not [key for r in records for key in r if key.startswith("log_")]


def test_the_study_summary_has_each_logged_key_per_stage(tmp_path):
    """run_rows reads the last step record's logs (the run ends with an epoch record, which has none) as the
    per-stage metric `log_<key>` at each stage's tap layer; a study claim may name one."""
    register_counting()
    run = load_run_config(None, [*TINY, f"out_dir={str(tmp_path)!r}", "model.objective=['counting', 'mim', 'mim', "
                                                                        "'classify']"])
    train(run)
    (tmp_path / RUN_SPEC).write_text(json.dumps({"config": {"model": {"taps": run.model.taps}}}))
    (tmp_path / PRETRAIN).write_text(json.dumps({"time": 1.0}))
    (tmp_path / ANALYSIS).write_text("layer,nmi,attention_distance\n")
    rows = pd.DataFrame(run_rows(Run("v", 0, tmp_path)))
    logs = rows[rows["metric"].str.startswith("log_")].sort_values(["metric", "stage"])
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["kind"] == "epoch"
    last = [r for r in records if r["kind"] == "step"][-1]
    assert logs[["metric", "stage", "layer"]].values.tolist() == [
        ["log_acc", 3, 4], ["log_images", 0, 1], ["log_width", 0, 1]]
    assert logs["value"].tolist() == [last["log_acc_stage"][3], 4.0, 64.0]
    assert metric_info("log_images") == ("stage", "pretrain") and metric_info("log_top-1") is None


@pytest.mark.slow
def test_a_pipeline_logs_what_the_single_process_trainer_logs(tmp_path):
    """2 pipeline ranks (stages 0-1 | 2-3), each stage's logs from the rank that holds it: classify's
    accuracy at stage 1 equals the single-process run's at every step."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_pipeline import assert_pipeline_equals_single_process

    assert_pipeline_equals_single_process(tmp_path, [
        "data.name=synthetic", "data.synthetic_size=32", "train.batch_size=8", "train.log_every=1",
        "train.max_steps=3", "pipeline.micro_batches=2", "pipeline.timeout_s=60",
        "model.objective=['mim', 'classify', 'mim', 'mim']"])
    for boundary in ("isolated", "global"):
        single, pipe = (pd.read_json(tmp_path / f"{run}_{boundary}" / "metrics.jsonl", lines=True)
                        .query("kind == 'step'")["log_acc_stage"].tolist() for run in ("single", "pipe"))
        assert len(single) == 3 and all(row[0] is None and row[2:] == [None, None] for row in pipe)
        assert np.allclose([row[1] for row in pipe], [row[1] for row in single], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------- no mask needed

@pytest.mark.parametrize("preset, objective", [(NANO, "contrastive"), (NANO, "classify"),
                                               ("resnet32_k4", "classify"), (NANO, ["classify", "counting"] * 2)])
def test_a_model_whose_heads_need_no_mask_runs_without_one(preset, objective):
    """`model(images)` and `model(images, None)` give the losses `model(images, mask)` gives: no head reads the
    mask, so the encoder reads whole images either way."""
    register_counting()
    model = isolocal.create_model(preset, boundary="isolated", objective=objective)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2 * model.views, model.cfg.in_chans, model.img_size, model.img_size, generator=g)
    labels = torch.tensor([1, 3])
    masked = model(images, model.random_mask(len(images), g), labels=labels)
    for out in (model(images, labels=labels), model(images, None, labels=labels)):
        assert out.mask is None
        assert all(torch.equal(a, b) for a, b in zip(out.losses, masked.losses))


def test_a_model_with_a_mim_stage_asks_for_the_mask():
    model = isolocal.create_model(NANO, objective=["mim", "classify", "mim", "classify"])
    with pytest.raises(ValueError, match=r"model.objective 'mim' needs a mask: pass one \(model.random_mask"):
        model(torch.randn(2, 1, 32, 32), labels=torch.tensor([0, 1]))
