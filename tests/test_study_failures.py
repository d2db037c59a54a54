"""`compare` failures: bad evaluation / analysis settings refused before the first run, `--report-only`
without runs refused, incomplete runs reported and redone, progress lines when the output is a file."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import isolocal
from isolocal.cli import main

REPO = Path(isolocal.__file__).resolve().parents[1]

# Two variants on synthetic images; `good` comes first, so a check made only when `broken` starts
# would come after `good` had pre-trained. 64 images in batches of 8: 8 steps per epoch, 16 in all.
STUDY = """
[study]
out_dir = "{out}"
images = "fmnist:0"
query = [[2, 2]]
evals = ["knn"]
[base]
preset = "localmim_vit_nano"
[base.data]
name = "synthetic"
synthetic_size = 64
[base.train]
epochs = 2
batch_size = 8
log_every = 1
[base.eval]
feature = "mean"
knn_k = 5
train_subset = 64
test_subset = 32
[variants.good]
[variants.broken]
"""


def study_file(tmp_path: Path, variants: str = "") -> Path:
    path = tmp_path / "study.toml"
    text = STUDY.format(out=tmp_path / "out")
    path.write_text(text if not variants else text[:text.index("[variants.good]")] + variants)
    return path


BAD_SETTINGS = [
    ("variants.broken.eval.knn_k=1000", "run broken seed 0: eval.knn_k = 1000 exceeds the 58 training images"),
    ("variants.broken.eval.test_subset=5000", "run broken seed 0: eval.test_subset = 5000 but the dataset holds only"),
    ("study.images='fmnist:99999'", "run good seed 0: --images 'fmnist:99999': indices [99999] out of range"),
    ("study.attention_image=3", "study.attention_image = 3 is not an index of the 1 images"),
    ("variants.broken.data.train_subset=1000", "data.train_subset (1000) exceeds the 64 training images"),
]


@pytest.mark.parametrize("override, message", BAD_SETTINGS, ids=[b[0] for b in BAD_SETTINGS])
def test_a_bad_run_setting_is_refused_before_the_first_run_starts(tmp_path, capsys, override, message):
    code = main(["compare", "-c", str(study_file(tmp_path)), "--set", override])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("isolocal compare: error: ") and message in err[0], err
    assert not (tmp_path / "out" / "runs").exists()  # no run started, `good` included


def test_report_only_refuses_a_directory_without_the_studys_runs(tmp_path, capsys):
    code = main(["compare", "-c", str(study_file(tmp_path)), "--report-only"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "holds none of study 'study''s runs" in err[0], err
    assert not (tmp_path / "out").exists()  # no empty report


@pytest.mark.parametrize("report_only", [False, True])
def test_a_study_directory_that_cannot_be_written_is_refused_before_any_run(tmp_path, capsys, report_only):
    """`out_dir` below a regular file (which stops root too): one line naming the path, nothing written."""
    (tmp_path / "file").write_text("not a directory\n")
    study = study_file(tmp_path)
    study.write_text(study.read_text().replace(str(tmp_path / "out"), str(tmp_path / "file" / "out")))
    (tmp_path / "runs").mkdir()  # nothing but the file and this is in tmp_path before and after
    code = main(["compare", "-c", str(study), *(["--report-only"] if report_only else [])])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and str(tmp_path / "file") in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "runs", "study.toml"]


@pytest.mark.slow
def test_progress_lines_off_a_terminal_and_an_incomplete_run_is_reported_then_redone(tmp_path):
    """stdout and stderr to a file: the 16 pre-training steps show as plain lines (step / total, rate, ETA);
    a run whose probes.json is deleted is "incomplete" in the report and redone by the next `compare`."""
    path = study_file(tmp_path, "[variants.good]\n")
    log = tmp_path / "compare.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}

    def compare(*extra: str) -> int:
        with open(log, "w") as out:
            return subprocess.run([sys.executable, "-m", "isolocal.cli", "compare", "-c", str(path), *extra], cwd=REPO,
                                  env=env, stdout=out, stderr=subprocess.STDOUT, timeout=900).returncode

    assert compare() == 0, log.read_text()[-3000:]
    text = log.read_text()
    progress = re.findall(r"good seed 0: \w[\w ]*: (\d+)/16 step \(\d+%\), [\d.]+ step/s(, ETA \w+)?", text)
    assert progress and "\r" not in text, text  # a line per 10 % the parent saw (how many: the poll's timing), no redraws
    assert [int(n) for n, _ in progress] == sorted(int(n) for n, _ in progress)
    assert re.search(r"pretrain \(global\): \d+/16 step \(\d+%\), [\d.]+ step/s, ETA", (tmp_path / "out" / "runs" / "good" /
                                                                              "run.log").read_text())

    run = tmp_path / "out" / "runs" / "good"
    (run / "probes.json").unlink()
    assert compare("--report-only") == 0
    report = (tmp_path / "out" / "report.md").read_text()
    assert "0 of 1 runs finished" in report and "**good seed 0 incomplete**: result.json says ok but probes.json" \
        in report
    assert compare() == 0 and (run / "probes.json").exists()
    assert "1 of 1 runs finished" in (tmp_path / "out" / "report.md").read_text()


def test_a_line_written_while_two_plain_bars_are_open(capsys):
    """`study.parallel = 2` off a terminal: a run's start line is written while the other run's bar is
    open; tqdm clears every open bar first, which a plain bar must allow (it has nothing to erase)."""
    import io

    from tqdm import tqdm

    from isolocal.core.progress import progress_bar

    log = io.StringIO()
    bars = [progress_bar(total=10, desc=f"run {i}", unit="step", file=log) for i in range(2)]
    tqdm.write("[compare] run 2/2 starts", file=log)
    bars[0].update(10)
    for bar in bars:
        bar.close()
    lines = log.getvalue().splitlines()
    assert lines[0] == "[compare] run 2/2 starts" and "\r" not in log.getvalue()
    assert any(line.startswith("run 0: 10/10 step (100%)") for line in lines), lines
