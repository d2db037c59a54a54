"""docs/extending.md's worked example, end to end: the VICReg-style head of examples/vicreg_head/ (a file outside
isolocal, with its own options and logs) trained from the command line with `--import` on two data-parallel
processes and across a two-rank DeepSpeed pipeline, compared global vs isolated in the example's own study (shrunk by `--set`: synthetic images, one
seed, k-NN, 2 steps), analysed (NMI) and exported to timm from a study run's checkpoint, which recorded the
import. Every command runs in a fresh process, as a user's would, so no head is registered in this one."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pandas as pd
import pytest
import timm
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_user_heads import isolocal_cli  # noqa: E402  (a sibling test module: the fresh-process runner)

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "vicreg_head"
HEAD_FILE = EXAMPLE / "vicreg.py"
LOGS = ["covariance", "invariance", "variance"]
TINY_DATA = ["data.name=synthetic", "data.synthetic_size=64", "data.train_subset=0", "train.max_steps=2",
             "train.batch_size=8", "train.log_every=1"]
TINY_EVAL = ["eval.train_subset=64", "eval.test_subset=32", "eval.knn_k=5"]


def test_the_docs_show_the_example_file_as_it_is():
    """docs/extending.md's head listing is examples/vicreg_head/vicreg.py, character for character."""
    doc = (REPO / "docs" / "extending.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", doc, flags=re.S)
    assert HEAD_FILE.read_text() in blocks


@pytest.mark.slow
def test_the_vicreg_example_trains_compares_analyses_and_exports(tmp_path):
    # pretrain --nproc 2 --import: both ranks import the file; the head's options and logs reach the run.
    run = tmp_path / "run"
    proc = isolocal_cli("pretrain", "--nproc", "2", "--import", str(HEAD_FILE), "--set", "model.objective=vicreg",
                        "model.head_options.vicreg.proj_dim=16", *TINY_DATA, "--out", str(run))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["world_size"] == 2 and state["config"]["imports"] == [str(HEAD_FILE)]
    assert state["config"]["model"]["head_options"] == {"vicreg": {"proj_dim": 16}}
    assert state["model"]["stages.0.head.proj.2.weight"].shape == (16, 16)
    steps = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "step"]
    assert len(steps) == 2
    for key in LOGS:
        assert all(len(r[f"log_{key}_stage"]) == 4 and all(v >= 0 for v in r[f"log_{key}_stage"]) for r in steps)

    # compare: the example's study, each run in its own process, tiny.
    out = tmp_path / "study"
    proc = isolocal_cli("compare", "-c", str(EXAMPLE / "study.toml"), "--set", f"study.out_dir={str(out)!r}",
                        "study.seeds=[0]", "study.evals=['knn']", "study.images='fmnist:0'",
                        "study.claims.isolation.metric='knn_top'", *(f"base.{s}" for s in TINY_DATA + TINY_EVAL))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    summary = pd.read_csv(out / "summary.csv")
    for variant in ("global", "isolated"):
        logged = summary[(summary["variant"] == variant) & summary["metric"].str.startswith("log_")]
        assert sorted(logged["metric"].unique()) == [f"log_{key}" for key in LOGS]
        assert sorted(logged["stage"].unique()) == [0, 1, 2, 3]
    report = (out / "report.md").read_text()
    assert all(f"## Head log `{key}` per stage" in report for key in LOGS)

    # analyze and export a study run's checkpoint: it recorded the import, so no --import is needed.
    ckpt = out / "runs" / "isolated" / "seed0"
    proc = isolocal_cli("analyze", "nmi", "--ckpt", str(ckpt), "--images", "fmnist:0", "--out", str(tmp_path / "fig"))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    nmi = pd.read_csv(tmp_path / "fig" / "nmi.csv")  # layer, the run's NMI, its heads'
    assert nmi["layer"].tolist() == [1, 2, 3, 4] and nmi.iloc[:, 1].between(0, 1).all()
    proc = isolocal_cli("export", "--ckpt", str(ckpt), "--out", str(tmp_path / "vit.pt"))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    spec = json.loads((tmp_path / "vit.json").read_text())
    vit = timm.create_model(spec["timm_model"], **spec["kwargs"]).eval()
    vit.load_state_dict(torch.load(tmp_path / "vit.pt", weights_only=True))
    assert vit(torch.randn(2, 1, 32, 32)).shape == (2, 64)


@pytest.mark.slow
def test_the_vicreg_example_trains_in_a_two_rank_pipeline(tmp_path):
    """The example head across a DeepSpeed pipeline (stages 0-1 | 2-3 on two ranks started by `--nproc`):
    both ranks import the file, and every stage's loss and logs reach the run's metrics."""
    run = tmp_path / "pipe"
    proc = isolocal_cli("pretrain", "--nproc", "2", "--pipeline-stages", "2", "--import", str(HEAD_FILE),
                        "--set", "model.objective=vicreg", "model.head_options.vicreg.proj_dim=16",
                        "pipeline.micro_batches=2", "pipeline.timeout_s=60", *TINY_DATA, "--out", str(run))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    steps = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "step"]
    assert len(steps) == 2 and all(len(r["loss_stage"]) == 4 for r in steps)
    for key in LOGS:
        assert all(len(r[f"log_{key}_stage"]) == 4 and all(v >= 0 for v in r[f"log_{key}_stage"]) for r in steps)
