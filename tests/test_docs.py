"""The docs run: every ```python block of README.md and docs/*.md, and every ```bash block marked
runnable, executes on tiny inputs; the README's export snippet gives the feature the probes read.

Markers, an HTML comment on the line right above a fence (invisible once rendered):
- `<!-- doc-test: skip (reason) -->`: a python block that cannot run here (GPU only, a huge model, files
  no test can make); the reason is required, and opt-outs stay few;
- `<!-- doc-test: run [--set KEY=VALUE ...] -->`: a bash block whose `isolocal` commands run one by one
  as written, the comment's overrides appended to each command that takes `--set` (they shrink the
  data, never change what the command does).
Other bash blocks (GPU launches, hour-long recipes) are not run. Every block runs in a directory that
holds `runs/x` (a 1-step nano run on synthetic images), its export `vit.pt` + `vit.json`, and links to
the repository's `experiments/` and `docs/`.
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import isolocal
from isolocal.cli import main
from isolocal.config.load import load_run_config
from isolocal.eval.features import pool_tokens
from isolocal.io.export import write_timm_export
from isolocal.train import train

REPO = Path(isolocal.__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
MARK = re.compile(r"<!-- doc-test: (skip|run)(.*?) -->")
FENCE = re.compile(r"```(\w*)")
RUN = ["preset=localmim_vit_nano", "data.name=synthetic", "data.synthetic_size=16", "train.batch_size=8",
       "train.max_steps=1"]


@dataclass(frozen=True)
class Block:
    """One fenced block of a Markdown file and the marker above it ("" when none)."""

    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    mark: str  # "", "skip" or "run"
    detail: str  # the skip's reason or the run's overrides

    def __str__(self) -> str:
        return f"{self.path.name}:{self.line}"


def fenced_blocks(path: Path) -> list[Block]:
    lines = path.read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        fence = FENCE.fullmatch(lines[i])
        if fence:
            end = lines.index("```", i + 1)
            mark = MARK.fullmatch(lines[i - 1].strip()) if i else None
            found.append(Block(path, i + 1, fence.group(1), "\n".join(lines[i + 1:end]) + "\n",
                               mark.group(1) if mark else "", mark.group(2).strip() if mark else ""))
            i = end
        i += 1
    return found


BLOCKS = [block for path in DOCS for block in fenced_blocks(path)]
PYTHON = [block for block in BLOCKS if block.lang == "python" and block.mark != "skip"]
SHELL = [block for block in BLOCKS if block.mark == "run"]
EXPORT_SNIPPET = next(block for block in PYTHON if 'json.load(open("vit.json"))' in block.code)


def commands(script: str) -> list[list[str]]:
    """A shell block's commands as argument lists (continuation lines joined, comments dropped)."""
    return [words for line in script.replace("\\\n", " ").splitlines() if (words := shlex.split(line, comments=True))]


def tiny_run(out: Path, *overrides: str) -> Path:
    train(load_run_config(None, [*RUN, *overrides, f"out_dir={str(out)!r}"]))
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("docs")
    for name in ("experiments", "docs"):
        (root / name).symlink_to(REPO / name)
    write_timm_export(tiny_run(root / "runs" / "x") / "last.pt", root / "vit.pt")
    return root


def test_markers_sit_above_blocks_they_apply_to_and_opt_outs_give_a_reason():
    marked = [block for block in BLOCKS if block.mark]
    lines = [line.strip() for path in DOCS for line in path.read_text().splitlines()]
    assert sum(bool(MARK.fullmatch(line)) for line in lines) == len(marked)  # none stray from its block
    skips = [block for block in marked if block.mark == "skip"]
    assert all(block.lang == "python" and re.fullmatch(r"\(.{10,}\)", block.detail) for block in skips), skips
    assert len(skips) <= 2 and all(block.lang == "bash" for block in SHELL) and SHELL


@pytest.mark.parametrize("block", PYTHON, ids=str)
def test_python_block_runs(block, workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    exec(compile(block.code, str(block), "exec"), {"__name__": "__main__"})


@pytest.mark.parametrize("block", SHELL, ids=str)
def test_runnable_shell_block_runs(block, workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    for words in commands(block.code):
        assert words[0] == "isolocal", f"{block}: only isolocal commands run here, got {words[0]}"
        argv = words[1:] + (shlex.split(block.detail) if "--set" in words else [])
        assert main(argv) == 0, f"{block}: isolocal {shlex.join(argv)}\n{capsys.readouterr().err}"


@pytest.mark.parametrize("preset, feature", [("localmim_vit_nano", "mean"), ("localmim_vit_nano", "cls"),
                                             ("localmim_swin_nano", "cls")])
def test_the_readme_export_snippet_gives_the_feature_the_probes_read(tmp_path, monkeypatch, preset, feature):
    """Exported with the run's eval.feature and loaded with exactly the README's lines, timm's output is
    the probes' pooled last-stage feature, bit for bit (Swin has no CLS token: its probes read the mean)."""
    monkeypatch.chdir(tmp_path)
    tiny_run(tmp_path / "run", f"preset={preset}", f"eval.feature={feature!r}")
    assert main(["export", "--ckpt", "run", "--out", "vit.pt"]) == 0
    namespace: dict = {}
    exec(compile(EXPORT_SNIPPET.code, str(EXPORT_SNIPPET), "exec"), namespace)
    model = isolocal.load_model("run")
    probed = feature if model.family.has_cls else "mean"
    with torch.no_grad():
        tokens = model.encode(namespace["images"])[-1]
    assert torch.equal(namespace["feature"], pool_tokens(tokens, probed, model.family.has_cls))
    if model.family.has_cls:  # the pooling decides: the other feature is another vector
        other = pool_tokens(tokens, {"mean": "cls", "cls": "mean"}[feature], True)
        assert not torch.allclose(namespace["feature"], other)
