"""A two-variant micro study end to end on synthetic data; the report's table against the runs' logs."""
import json

import pandas as pd
import pytest

from isolocal.compare import load_study, run_study
from isolocal.config import ConfigError

STUDY = """
[study]
name = "micro"
out_dir = "{out}"
images = "skimage:camera,coins"
query = [[2, 2]]

[base]
preset = "localmim_vit_nano"
[base.data]
name = "synthetic"
synthetic_size = 64
[base.train]
epochs = 1
batch_size = 16
log_every = 1
[base.eval]
feature = "mean"
knn_k = 5
linear_epochs = 2
train_subset = 64
test_subset = 32

[variants.global]
model = {{ boundary = "global" }}
[variants.isolated]
model = {{ boundary = "isolated" }}
[variants.broken]
data = {{ name = "folder", root = "{out}/no-such-folder" }}
"""


@pytest.mark.slow
def test_micro_study_report_matches_the_run_logs(tmp_path):
    path = tmp_path / "study.toml"
    path.write_text(STUDY.format(out=tmp_path / "report"))
    report = run_study(str(path), [])
    root = tmp_path / "report"
    summary = pd.read_csv(root / "summary.csv").set_index("variant")
    assert list(summary.index) == ["global", "isolated", "broken"]
    assert list(summary["status"]) == ["ok", "ok", "failed"], summary.get("error")
    assert summary.loc["broken", "status"] == "failed" and "no-such-folder" in summary.loc["broken", "error"]
    for name in ("global", "isolated"):
        run = root / "runs" / name
        steps = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "step"]
        for k, loss in enumerate(steps[-1]["loss_stage"]):
            assert summary.loc[name, f"loss_s{k}"] == pytest.approx(loss, rel=1e-12)
        evals = json.loads((run / "eval.json").read_text())["results"]
        for mode in ("knn", "linear"):
            accs = [r[f"{mode}_top1"] for r in evals]
            assert [summary.loc[name, f"{mode}_s{k}"] for k in range(4)] == pytest.approx(accs)
        analysis = pd.read_csv(run / "analysis.csv").set_index("layer")
        assert summary.loc[name, "nmi_l2"] == pytest.approx(analysis.loc[2, "nmi"])
        assert summary.loc[name, "img_per_s"] == pytest.approx(pd.Series([s["img_per_s"] for s in steps]).median())
    # same seed, data and masks: the first step's losses agree between global and isolated
    first = [json.loads((root / "runs" / n / "metrics.jsonl").read_text().splitlines()[0])["loss_stage"]
             for n in ("global", "isolated")]
    assert first[0] == pytest.approx(first[1], rel=1e-6)
    text = report.read_text()
    assert "broken failed" in text and "| global" in text
    for fig in ("loss_curves.png", "accuracy_vs_time.png", "nmi_vs_depth.png", "distance_vs_depth.png"):
        assert (root / fig).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # --report-only rebuilds the same table without training
    (root / "summary.csv").unlink()
    run_study(str(path), [], report_only=True)
    pd.testing.assert_frame_equal(pd.read_csv(root / "summary.csv").set_index("variant"), summary)


def test_bad_variant_is_an_error_before_any_work(tmp_path):
    path = tmp_path / "study.toml"
    path.write_text(STUDY.format(out=tmp_path / "report").replace('boundary = "isolated"', 'boundary = "detached"'))
    with pytest.raises(ConfigError, match="variant isolated: boundary 'detached'"):
        load_study(path)
    assert not (tmp_path / "report").exists()
