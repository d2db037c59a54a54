"""A head of one's own reaches every process that needs it: `imports` / `--import` are imported before the
config is checked and recorded in the run's config, from which a study's run processes, the ranks of a
launch and every reader of a checkpoint import them again; installed packages register through the
`isolocal.heads` entry points. Readers that need only the encoder (eval, export, analysis) load a checkpoint
whose head module is gone, skipping its heads in one line; training (`--resume`, `--init`) refuses in one line.

The head is a VICReg-style loss written to a temporary file, as a user would write it. Tests that import it
in this process (`main(...)`, `load_model`) leave the registry as they found it (`own_registry`), so each
starts as a fresh process would.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import isolocal
from isolocal.cli import main
from isolocal.config.imports import resolve_imports
from isolocal.heads import HEADS
from isolocal.io.checkpoint import LAST
from isolocal.io.load import load_model

REPO = Path(isolocal.__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}

HEAD_MODULE = '''"""A user's head: VICReg's loss on pooled, projected features of the two views of each image."""
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from isolocal.heads import HeadInputs, HeadOutput, StageHead, pool, register_head


class VICRegHead(StageHead):
    needs = frozenset({"views"})

    def __init__(self, dim: int, proj_dim: int):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, proj_dim))

    def loss(self, features: Tensor, inputs: HeadInputs) -> HeadOutput:
        z1, z2 = self.proj(pool(features, inputs.prefix)).float().chunk(2)
        invariance = F.mse_loss(z1, z2)
        variance = sum(F.relu(1 - torch.sqrt(z.var(dim=0) + 1e-4)).mean() for z in (z1, z2))
        covariance = sum((torch.cov(z.T).fill_diagonal_(0) ** 2).sum() / z.shape[1] for z in (z1, z2))
        return HeadOutput(25 * invariance + 25 * variance + covariance, torch.cat([z1, z2]))


def register_wide():
    register_head("vicreg_wide", VICRegHead.needs, lambda cfg, dim: VICRegHead(dim, 2 * cfg.proj_dim))


register_head("vicreg", VICRegHead.needs, lambda cfg, dim: VICRegHead(dim, cfg.proj_dim))
'''
TINY = ["data.name=synthetic", "data.synthetic_size=32", "train.batch_size=8", "train.log_every=1"]
EVAL = ["data.name=synthetic", "data.synthetic_size=64", "eval.train_subset=64", "eval.test_subset=32",
        "eval.knn_k=5", "eval.feature=mean"]
SKIPPED = "(objective 'vicreg') were skipped"


@contextlib.contextmanager
def own_registry() -> Iterator[None]:
    """Heads registered and files imported inside are gone afterwards, as in a fresh process."""
    heads, modules = dict(HEADS), set(sys.modules)
    try:
        yield
    finally:
        HEADS.clear()
        HEADS.update(heads)
        for name in set(sys.modules) - modules:
            if name.startswith("isolocal_import_"):
                del sys.modules[name]


@pytest.fixture(autouse=True)
def _fresh_registry():
    with own_registry():
        yield


@contextlib.contextmanager
def moved_away(path: Path) -> Iterator[Path]:
    """The user's module is gone from where the run recorded it (yields where it went)."""
    away = path.with_name(f"moved_{path.name}")
    path.rename(away)
    try:
        yield away
    finally:
        away.rename(path)


def isolocal_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """`python -m isolocal.cli ...` in a fresh process."""
    return subprocess.run([sys.executable, "-m", "isolocal.cli", *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=600)


def skip_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if SKIPPED in line]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(the head's file, a run directory) from `pretrain --import <file> --set model.objective=vicreg`, 2 steps."""
    root = tmp_path_factory.mktemp("user_heads")
    module = root / "heads" / "vicreg_heads.py"
    module.parent.mkdir()
    module.write_text(HEAD_MODULE)
    with own_registry():
        code = main(["pretrain", "--import", str(module), "--set", "model.objective=vicreg", *TINY, "train.max_steps=2",
                     "--out", str(root / "run")])
    assert code == 0
    return module, root / "run"


def test_pretrain_with_import_trains_the_users_head_and_records_the_import(trained):
    module, run = trained
    assert "vicreg" not in HEADS  # the fixture's process state is gone: only the run's records remain
    config = (run / "config.toml").read_text()
    assert f'"{module}"' in config and "imports" in config
    state = torch.load(run / LAST, weights_only=True)
    assert state["config"]["imports"] == [str(module)] and state["config"]["model"]["objective"] == "vicreg"
    assert {f"stages.{k}.head.proj.2.weight" for k in range(4)} <= state["model"].keys()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "step"]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


def test_a_saved_import_gives_the_whole_model_to_a_reader(trained):
    """`load_model` imports the checkpoint's recorded module: the user's heads, every weight as saved."""
    module, run = trained
    model = load_model(run)
    assert type(model.stages[3].head).__name__ == "VICRegHead" and model.plan.skipped == ()
    saved = torch.load(run / LAST, weights_only=True)["model"]
    assert model.state_dict().keys() == saved.keys()
    assert all(torch.equal(model.state_dict()[key], value) for key, value in saved.items())


def test_eval_and_export_without_the_module_load_the_encoder_and_say_so_once(trained, tmp_path):
    module, run = trained
    with moved_away(module) as away:
        knn = isolocal_cli("eval", "knn", "--ckpt", str(run), "--set", *EVAL)
        export = isolocal_cli("export", "--ckpt", str(run), "--out", str(tmp_path / "bare.pt"))
        for proc in (knn, export):
            assert proc.returncode == 0, proc.stderr[-2000:]
            lines = skip_lines(proc.stderr)
            assert len(lines) == 1 and "stages [0, 1, 2, 3]" in lines[0] and "--import" in lines[0], proc.stderr
        assert "knn_top1" in knn.stdout
        # With the module given (moved), the whole model loads, silently, and the encoder is the same.
        code = main(["export", "--ckpt", str(run), "--out", str(tmp_path / "whole.pt"), "--import", str(away)])
        assert code == 0
    bare, whole = (torch.load(tmp_path / f"{name}.pt", weights_only=True) for name in ("bare", "whole"))
    assert bare.keys() == whole.keys() and all(torch.equal(bare[k], whole[k]) for k in bare)


def test_a_pipeline_checkpoint_without_the_module_loads_its_encoder(trained, tmp_path, capsys):
    """The pipeline format (layer files + the client state's config), written from the run's weights."""
    module, run = trained
    saved = torch.load(run / LAST, weights_only=True)
    tag = tmp_path / "pipe" / "pipeline" / "step_2"
    tag.mkdir(parents=True)
    (tag.parent / "latest").write_text("step_2")
    torch.save({"config": saved["config"]}, tag / "mp_rank_00_model_states.pt")
    for k in range(4):
        prefix = f"stages.{k}."
        torch.save({key[len(prefix):]: v for key, v in saved["model"].items() if key.startswith(prefix)},
                   tag / f"layer_{k:02d}-model_states.pt")
    with moved_away(module):
        model = load_model(tmp_path / "pipe")
    assert len(skip_lines(capsys.readouterr().err)) == 1 and model.plan.skipped == (0, 1, 2, 3)
    encoder = {key: value for key, value in saved["model"].items() if ".head." not in key}
    assert model.state_dict().keys() == encoder.keys()
    assert all(torch.equal(model.state_dict()[key], value) for key, value in encoder.items())
    with pytest.raises(ValueError, match="head 'vicreg' was skipped when the model was loaded"):
        model(torch.randn(2, 1, 32, 32), model.random_mask(2))


def test_training_without_the_module_is_refused_in_one_line_naming_the_head(trained, tmp_path, capsys):
    """--resume and --init need every head: without the module, one line, exit 2, nothing written; with it,
    the run resumes."""
    module, run = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    before = (copy / LAST).read_bytes()
    cases = [
        (["--resume", "--out", str(copy), "--set", "model.objective=vicreg", *TINY, "train.max_steps=3"],
         "model.objective 'vicreg' is not a head"),
        (["--init", str(run), "--out", str(tmp_path / "new"), "--set", "model.objective=vicreg", *TINY],
         "model.objective 'vicreg' is not a head"),
    ]
    for args, message in cases:
        assert main(["pretrain", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0] and "--import MODULE_OR_PATH" in err[0], err
    with moved_away(module):  # the run's own config names the file, which is gone
        assert main(["pretrain", "--resume", "-c", str(copy / "config.toml"), "--out", str(copy)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"cannot import '{module}': no such file" in err[0], err
    assert (copy / LAST).read_bytes() == before and not (tmp_path / "new").exists()
    assert main(["pretrain", "--resume", "-c", str(copy / "config.toml"), "--out", str(copy),
                 "--set", "train.max_steps=3"]) == 0
    assert torch.load(copy / LAST, weights_only=True)["step"] == 3


STUDY = """
[study]
out_dir = "{out}"
images = "fmnist:0"
query = [[2, 2]]
evals = ["knn"]
[base]
preset = "localmim_vit_nano"
imports = [{imports}]
[base.model]
objective = "vicreg"
[base.data]
name = "synthetic"
synthetic_size = 64
[base.train]
max_steps = 2
batch_size = 8
log_every = 1
[base.eval]
feature = "mean"
knn_k = 5
train_subset = 64
test_subset = 32
[variants.global]
[variants.isolated]
model.boundary = "isolated"
"""


def study_file(folder: Path, imports: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "study.toml"
    path.write_text(STUDY.format(out=folder / "out", imports=imports))
    return path


BAD = [("nonexistent_heads_module", "ModuleNotFoundError: No module named 'nonexistent_heads_module'"),
       ("broken.py", "SyntaxError: ")]
COMMANDS = {
    "pretrain": ["pretrain", "--out", "{tmp}/run"],
    "info": ["info"],
    "eval": ["eval", "knn", "--ckpt", "random", "--out", "{tmp}/eval/results.json"],
    "export": ["export", "--ckpt", "{tmp}/missing", "--out", "{tmp}/export/x.pt"],
    "analyze": ["analyze", "nmi", "--ckpt", "{tmp}/missing", "--images", "fmnist:0", "--out", "{tmp}/figures"],
    "compare": ["compare", "-c", "{tmp}/study/study.toml"],
}


@pytest.mark.parametrize("spec, error", BAD, ids=["module", "file"])
@pytest.mark.parametrize("command", COMMANDS)
def test_a_bad_import_is_one_line_and_exit_2_before_any_work(tmp_path, capsys, monkeypatch, command, spec, error):
    monkeypatch.chdir(tmp_path)  # relative --import paths resolve against the working directory
    (tmp_path / "broken.py").write_text("def heads(:\n")
    study_file(tmp_path / "study", "")
    args = [a.format(tmp=tmp_path) for a in COMMANDS[command]]
    assert main([*args, "--import", spec]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    named = str(tmp_path / spec) if spec.endswith(".py") else spec
    assert len(err) == 1 and f"cannot import '{named}': {error}" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.py", "study"]
    assert sorted(p.name for p in (tmp_path / "study").iterdir()) == ["study.toml"]


def test_a_config_files_imports_resolve_against_its_directory(tmp_path, capsys):
    """`imports = ["broken.py"]` in configs/run.toml is configs/broken.py, whatever the working directory."""
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "broken.py").write_text("def heads(:\n")
    (tmp_path / "configs" / "run.toml").write_text('imports = ["broken.py", "json"]\n')
    assert main(["info", "-c", str(tmp_path / "configs" / "run.toml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"cannot import '{tmp_path / 'configs' / 'broken.py'}': SyntaxError" in err[0], err
    assert resolve_imports(["json", "a/b.py", "json", "a/../a/b.py"], tmp_path) == ["json", str(tmp_path / "a" / "b.py")]
    with pytest.raises(ValueError, match=r"imports\[0\]: 3 is not a module name or a .py path"):
        resolve_imports([3], tmp_path)
    with pytest.raises(ValueError, match="imports: 'x.py' has the wrong type; expected a list"):
        resolve_imports("x.py", tmp_path)


def test_an_installed_package_registers_heads_through_entry_points(tmp_path):
    """A dist-info directory on sys.path declares `isolocal.heads` entry points: a module (registering on
    import) and a function (called); both are found the first time a model names them."""
    (tmp_path / "vicreg_plugin.py").write_text(HEAD_MODULE)
    info = tmp_path / "isolocal_vicreg-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: isolocal-vicreg\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[isolocal.heads]\nvicreg = vicreg_plugin\n"
                                           "vicreg_wide = vicreg_plugin:register_wide\n")
    script = ("import isolocal\nfrom isolocal.heads import HEADS\nassert 'vicreg' not in HEADS\n"
              "model = isolocal.create_model('localmim_vit_nano', objective=['vicreg', 'vicreg_wide', 'mim', 'mim'])\n"
              "print([type(s.head).__name__ for s in model.stages[:2]], model.stages[1].head.proj[2].out_features)\n")
    env = {**ENV, "PYTHONPATH": f"{ENV['PYTHONPATH']}{os.pathsep}{tmp_path}"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["['VICRegHead',", "'VICRegHead']", "256"]


@pytest.mark.slow
def test_a_studys_base_imports_reach_its_run_processes_and_the_report(tmp_path):
    """`[base] imports = ["vicreg_heads.py"]` next to the study file (run from another directory): both runs,
    each in its own process, train the user's head; `--report-only` reads them again."""
    folder = tmp_path / "study"
    folder.mkdir()
    (folder / "vicreg_heads.py").write_text(HEAD_MODULE)
    path = study_file(folder, '"vicreg_heads.py"')
    proc = isolocal_cli("compare", "-c", str(path))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    for variant in ("global", "isolated"):
        run = folder / "out" / "runs" / variant
        assert json.loads((run / "result.json").read_text())["status"] == "ok"
        assert json.loads((run / "run.json").read_text())["config"]["imports"] == [str(folder / "vicreg_heads.py")]
        assert not skip_lines((run / "run.log").read_text())  # its evaluation loaded the whole model
    assert main(["compare", "-c", str(path), "--report-only"]) == 0
    assert "- isolated: vicreg (stages 0, 1, 2, 3); boundary 'isolated'" in (folder / "out" / "report.md").read_text()


@pytest.mark.slow
def test_every_rank_of_a_launch_imports_the_module(tmp_path):
    """`pretrain --nproc 2` (torchrun's launcher): both data-parallel ranks import the relative --import."""
    (tmp_path / "vicreg_heads.py").write_text(HEAD_MODULE)
    proc = isolocal_cli("pretrain", "--nproc", "2", "--import", "vicreg_heads.py", "--set", "model.objective=vicreg",
                        *TINY, "train.max_steps=2", "--out", "run", cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    state = torch.load(tmp_path / "run" / LAST, weights_only=True)
    assert state["world_size"] == 2 and state["step"] == 2
    assert state["config"]["imports"] == [str(tmp_path / "vicreg_heads.py")]
