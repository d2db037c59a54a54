"""Mutation check of isolocal's core: make one-line bugs on purpose and see whether the tests notice.

    python tools/mutate.py                      # every module below, 2 jobs
    python tools/mutate.py --module isolocal/core/targets.py --jobs 2
    python tools/mutate.py --list               # print the mutants, run nothing
    python tools/mutate.py --resume             # go on after an interrupted run (outcomes kept in --report)

Why: a green suite says nothing about the bugs it cannot see. Each mutant changes one operator,
constant, comparison, boolean, sign, value-preserving call (`.detach()`, `.float()`, ...) or drops one
call statement or augmented assignment in a module where a silent bug changes results. The
module's fast tests run against it (`pytest -x`, with a per-mutant timeout); a failing or timed-out
run kills the mutant, a passing run lets it survive.

Safety: mutants are written only into copies of the working tree under a temporary directory
(one per job), never into the checkout this script is run from. Tests run in forked children of a
process that has already imported torch and friends, so a mutant costs its tests, not the imports.
Every write of a mutated or restored file gets a new modification time, so Python's bytecode cache
can never serve one version's .pyc for another of the same size.

Survivors that cannot change any result are listed, with the reason, in the "Equivalent mutants"
section of docs/testing.md as lines "- `KEY` -- reason", those that change only what runs on a CUDA
device in "CUDA-only mutants"; listed mutants are not run, and the score is
killed / (mutants - listed).
The report (every mutant, its outcome and time) is written as JSON to --report.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "testing.md"

# module -> pytest arguments: the tests that can see a bug in it, most telling first (with -x the
# first failure ends the run). Tests that build ViT-B / Swin-B / Swin-T are left out: seconds of
# weight init each, and they check renaming and block counts, not these modules' numbers.
FAST = "not vit_b_exports and not swin_base_export and not swin_tiny_export and not published_vit_b"
EARLY_REDUCE = ("tests/test_gpu_readiness.py::"
                "test_isolated_data_parallel_reduces_start_after_each_stage_and_average_bit_identically")
RESNET_HEADS = ("tests/test_resnet.py::test_classify_reads_maps_through_a_conv_and_tokens_as_before",
                "tests/test_resnet.py::test_isolated_stages_get_only_their_own_losses_gradient")
HEAD_ACCURACY = "tests/test_eval.py::test_head_accuracy_is_each_classify_heads_argmax_agreement_with_the_labels"
MODULES: dict[str, list[str]] = {
    "isolocal/models/encoder.py": ["tests/test_model.py", "tests/test_swin.py::test_isolation_on_nano_swin",
                                   "tests/test_swin.py::test_simmim_dense_encoder_trains_mask_token",
                                   *[f"tests/test_failures.py::test_{name}" for name in (
                                       "a_mask_that_is_not_bool_is_a_type_error_naming_its_dtype",
                                       "a_mask_without_visible_or_masked_tokens_is_refused",
                                       "non_finite_images_are_refused_in_forward_and_encode",
                                       "images_of_the_wrong_shape_name_the_expected_one",
                                       "integer_images_and_a_mask_of_the_wrong_shape")],
                                   "tests/test_failures_io.py::test_create_model_refuses_what_the_config_refuses",
                                   *[f"tests/test_heads.py::test_{name}" for name in (
                                       "isolation_holds_under_autograd_for_every_head",
                                       "mim_losses_equal_the_code_before_the_heads",
                                       "other_heads_leave_the_mim_stages_numbers_unchanged",
                                       "a_forward_without_the_labels_a_head_needs_is_refused",
                                       "two_views_are_independent_augmentations_stacked_view_first")],
                                   *[f"tests/test_resnet.py::test_{name}" for name in (
                                       "bad_resnet_configs_are_refused_before_any_weights",
                                       "every_reconstructing_head_is_named_when_a_resnet_is_given_one",
                                       "a_new_model_recomputes_nothing_until_checkpointing_is_set")], "-k", FAST],
    "isolocal/core/stages.py": ["tests/test_model.py", "tests/test_swin.py::test_isolation_on_nano_swin",
                                *[f"tests/test_heads.py::test_{name}" for name in (
                                    "the_stage_plan_is_resolved_once_from_the_config",
                                    "a_bad_objective_or_boundary_fails_in_the_plan_before_any_weights",
                                    "isolation_holds_under_autograd_for_every_head")],
                                "tests/test_resnet.py::test_isolated_stages_get_only_their_own_losses_gradient",
                                "-k", FAST],
    "isolocal/heads/plan.py": ["tests/test_heads.py", "tests/test_resnet.py",
                               "tests/test_failures_io.py::test_a_micro_batch_of_two_can_contrast", "-m", "not slow"],
    "isolocal/heads/base.py": ["tests/test_heads.py", *RESNET_HEADS, "-m", "not slow"],
    "isolocal/heads/classify.py": ["tests/test_heads.py", *RESNET_HEADS, HEAD_ACCURACY, "-m", "not slow"],
    "isolocal/heads/contrastive.py": ["tests/test_heads.py", *RESNET_HEADS, "-m", "not slow"],
    "isolocal/models/resnet.py": ["tests/test_resnet.py", "-m", "not slow"],
    "isolocal/models/recompute.py": [
        "tests/test_resnet.py::test_gradient_checkpointing_changes_no_loss_gradient_or_batch_statistic",
        "tests/test_resnet.py::test_a_new_model_recomputes_nothing_until_checkpointing_is_set"],
    "isolocal/eval/head_accuracy.py": [
        HEAD_ACCURACY, "tests/test_eval.py::test_head_accuracy_scores_in_eval_mode_and_changes_no_weight_or_statistic",
        "tests/test_eval.py::test_eval_head_reports_only_the_classify_stages"],
    "isolocal/models/decoder.py": ["tests/test_model.py", "tests/test_posembed.py",
                                   "tests/test_swin.py::test_nano_preset_shapes", "-k", FAST],
    "isolocal/models/family.py": ["tests/test_model.py", "tests/test_swin.py",
                                  "tests/test_heads.py::test_attention_analysis_and_maps_work_on_a_classify_model",
                                  "-k", FAST],
    "isolocal/core/targets.py": ["tests/test_targets.py",
                            "tests/test_model.py::test_loss_is_the_weighted_mse_over_masked_cells",
                            "tests/test_heads.py::test_isolation_holds_under_autograd_for_every_head"],
    "isolocal/core/masking.py": ["tests/test_masking.py", "tests/test_model.py", "tests/test_swin.py", "-k", FAST],
    "isolocal/train/step.py": ["tests/test_model.py::test_stagewise_isolated_step_gives_the_gradients_of_the_summed_loss",
                               "tests/test_model.py::test_global_step_divides_by_accum_and_scales",
                               "tests/test_model.py::test_stagewise_backward_is_used_exactly_when_isolated_with_several_stages",
                               "tests/test_train.py::test_clip_stage_gradients_clips_each_stage_on_its_own_norm",
                               "tests/test_train.py::test_gradients_are_clipped_per_stage",
                               "tests/test_train.py::test_isolated_training_holds_fewer_activations_than_global",
                               EARLY_REDUCE],
    "isolocal/train/distributed.py": [
        "tests/test_train.py::test_averaged_gradients_of_two_processes_equal_one_process_over_the_whole_batch",
        "tests/test_train.py::test_two_process_data_parallel_ends_with_identical_parameters", EARLY_REDUCE],
    "isolocal/train/pipeline/engine.py": [
        "tests/test_pipeline.py::test_isolated_schedule_only_sends_forward_and_holds_two_micro_batches",
        "tests/test_pipeline.py::"
        "test_profiling_times_every_instruction_and_the_isolated_ranks_own_waits_in_known_categories",
        "tests/test_pipeline.py::test_build_engine_defaults_to_the_auto_schedule_without_clipping",
        "tests/test_pipeline.py::test_two_ranks_match_single_process_gradients_and_params",
        "tests/test_pipeline.py::test_four_ranks_and_data_parallel_match_single_process"],
    "analysis/metrics.py": ["tests/test_analysis.py", "tests/test_failures_io.py::test_attention_metrics_refuse_a_map_"
                            "without_its_image_axis_or_not_a_softmax"],
    "analysis/capture.py": ["tests/test_analysis.py",
                            "tests/test_analysis_cli.py::test_swin_window_attention_capture_layouts_and_cli"],
}
# Modules mutated only in some functions: distributed.py's numbers (the process-group plumbing around
# them fails loudly, by a hang or a crash, rather than changing a result).
ONLY = {
    "isolocal/train/distributed.py": ("broadcast_parameters", "GradientAverager", "average_gradients",
                                      "mean_over_ranks", "max_over_ranks", "gather_objects"),
}
# Functions left out of the mutation scope, with the reason (also in docs/testing.md).
EXCLUDED = {
    "isolocal/core/masking.py": {"to_device": "host-to-CUDA copies; on a CPU-only machine it returns its input"},
    "isolocal/models/encoder.py": {"StagewiseEncoder.compile_stages": "torch.compile wiring; its test compiles for minutes",
                                   "_compiled_in_training": "torch.compile wiring; its test compiles for minutes"},
}
# Startup costs that dwarf a killed mutant's test: autoloaded plugins (hypothesis alone imports for
# seconds at the end of every run) and five full garbage collections over torch's heap at exit.
PYTEST_LEAN = ["-p", "no:cacheprovider", "-p", "no:unraisableexception", "-p", "no:threadexception"]
PRELOAD = ("numpy", "torch", "timm", "scipy", "scipy.stats", "pandas", "matplotlib", "matplotlib.pyplot",
           "skimage", "tqdm", "pytest", "deepspeed")

SWAPS = {
    ast.Add: "-", ast.Sub: "+", ast.Mult: "/", ast.Div: "*", ast.FloorDiv: "/", ast.Mod: "*", ast.Pow: "*",
    ast.MatMult: "*", ast.LShift: ">>", ast.RShift: "<<", ast.BitAnd: "|", ast.BitOr: "&",
    ast.Lt: "<=", ast.LtE: "<", ast.Gt: ">=", ast.GtE: ">", ast.Eq: "!=", ast.NotEq: "==",
    ast.In: "not in", ast.NotIn: "in", ast.Is: "is not", ast.IsNot: "is", ast.And: "or", ast.Or: "and",
}
SYMBOLS = {
    ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//", ast.Mod: "%", ast.Pow: "**",
    ast.MatMult: "@", ast.LShift: "<<", ast.RShift: ">>", ast.BitAnd: "&", ast.BitOr: "|",
    ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!=",
    ast.In: "in", ast.NotIn: "not in", ast.Is: "is", ast.IsNot: "is not", ast.And: "and", ast.Or: "or",
}
# Zero-argument methods whose removal keeps the value's type, so the mutant runs and can be wrong.
DROPPABLE = {"detach", "clone", "float", "double", "contiguous", "sqrt", "exp", "abs", "log", "t"}
MESSAGE_CALLS = {"require", "_require", "ValueError", "TypeError", "RuntimeError", "ConfigError", "print", "warn"}


@dataclass
class Mutant:
    path: str
    line: int
    key: str  # stable across line shifts: path::function::source line::old->new[#n]
    start: tuple[int, int]  # (line, col) of the replaced span, 1-based line, 0-based col
    end: tuple[int, int]
    new: str
    status: str = "pending"  # killed | survived | timeout | error N | equivalent | cuda-only (listed)
    seconds: float = 0.0  # wall clock
    cpu: float = 0.0  # CPU seconds of the test run and the processes it waited for


class Finder(ast.NodeVisitor):
    """Collect mutation sites of one module (see the module docstring for the operators)."""

    def __init__(self, path: str, source: str):
        self.path, self.lines = path, source.splitlines()
        self.scope: list[str] = []
        self.found: list[Mutant] = []
        self.seen: dict[str, int] = {}

    # -- helpers
    def add(self, start: tuple[int, int], end: tuple[int, int], old: str, new: str) -> None:
        line = self.lines[start[0] - 1]
        if "pragma: no mutate" in line:
            return
        base = f"{self.path}::{'.'.join(self.scope) or '<module>'}::{line.strip()}::{old}->{new}"
        n = self.seen.get(base, 0)
        self.seen[base] = n + 1
        self.found.append(Mutant(self.path, start[0], base + (f"#{n}" if n else ""), start, end, new))

    def text(self, start: tuple[int, int], end: tuple[int, int]) -> str:
        (l0, c0), (l1, c1) = start, end
        if l0 == l1:
            return self.lines[l0 - 1][c0:c1]
        return "\n".join([self.lines[l0 - 1][c0:]] + self.lines[l0:l1 - 1] + [self.lines[l1 - 1][:c1]])

    def operator_between(self, left: ast.AST, right: ast.AST, op: ast.AST) -> None:
        start, end = (left.end_lineno, left.end_col_offset), (right.lineno, right.col_offset)
        span = self.text(start, end)
        symbol = SYMBOLS[type(op)]
        pattern = r"(?<![\w<>=!*/])" + re.escape(symbol).replace(r"\ ", r"\s+") + r"(?![\w<>=*/])"
        match = re.search(pattern, span)
        if match is None:
            return
        pos = self.offset(start, match.start())
        self.add(pos, self.offset(start, match.end()), symbol, SWAPS[type(op)])

    def offset(self, start: tuple[int, int], k: int) -> tuple[int, int]:
        """(line, col) k characters after `start` in the source."""
        line, col = start
        while k > len(self.lines[line - 1]) - col:
            k -= len(self.lines[line - 1]) - col + 1
            line, col = line + 1, 0
        return line, col + k

    @staticmethod
    def pos(node: ast.AST) -> tuple[tuple[int, int], tuple[int, int]]:
        return (node.lineno, node.col_offset), (node.end_lineno, node.end_col_offset)

    # -- scopes and skipped parts
    def visit_body(self, body: list[ast.stmt]) -> None:
        for i, stmt in enumerate(body):
            if i == 0 and isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) \
                    and isinstance(stmt.value.value, str):
                continue  # docstring
            self.visit(stmt)

    def visit_Module(self, node: ast.Module) -> None:
        self.visit_body(node.body)

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self.scope.append(node.name)
        for default in node.args.defaults + [d for d in node.args.kw_defaults if d is not None]:
            self.visit(default)
        self.visit_body(node.body)
        self.scope.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self.scope.append(node.name)
        self.visit_body(node.body)
        self.scope.pop()

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:
            self.visit(node.value)

    def visit_Import(self, node: ast.AST) -> None:
        return

    visit_ImportFrom = visit_Import

    def visit_Raise(self, node: ast.Raise) -> None:
        return  # what is raised is the message; the condition that raises is mutated where it is

    def visit_JoinedStr(self, node: ast.JoinedStr) -> None:
        return

    def visit_Call(self, node: ast.Call) -> None:
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        if name in MESSAGE_CALLS:
            if name in ("require", "_require") and node.args:
                self.visit(node.args[0])  # the condition, not the message
            return
        if isinstance(node.func, ast.Attribute) and name in DROPPABLE and not node.args and not node.keywords:
            start, end = self.pos(node)
            receiver_end = (node.func.value.end_lineno, node.func.value.end_col_offset)
            self.add(start, end, f".{name}()", self.text(start, receiver_end))
        self.generic_visit(node)

    # -- mutations
    def visit_Expr(self, node: ast.Expr) -> None:
        if isinstance(node.value, ast.Call):
            start, end = self.pos(node)
            self.add(start, end, "<call statement>", "pass")
        self.generic_visit(node)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        start, end = self.pos(node)
        self.add(start, end, "<augmented assignment>", "pass")
        if type(node.op) in SWAPS:
            self.operator_between(node.target, node.value, node.op)
        self.generic_visit(node)

    def visit_BinOp(self, node: ast.BinOp) -> None:
        if type(node.op) in SWAPS:
            self.operator_between(node.left, node.right, node.op)
        self.generic_visit(node)

    def visit_Compare(self, node: ast.Compare) -> None:
        for left, op, right in zip([node.left] + node.comparators, node.ops, node.comparators):
            self.operator_between(left, right, op)
        self.generic_visit(node)

    def visit_BoolOp(self, node: ast.BoolOp) -> None:
        for left, right in zip(node.values, node.values[1:]):
            self.operator_between(left, right, node.op)
        self.generic_visit(node)

    def visit_UnaryOp(self, node: ast.UnaryOp) -> None:
        if isinstance(node.op, (ast.Not, ast.USub, ast.Invert)):
            start, end = self.pos(node)
            self.add(start, end, self.text(start, end), self.text(*self.pos(node.operand)))
        self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        start, end = self.pos(node)
        old = self.text(start, end)
        value = node.value
        if isinstance(value, bool):
            new = str(not value)
        elif isinstance(value, int):
            new = str(value + 1)
        elif isinstance(value, float):
            new = repr(value + 1.0)
        elif isinstance(value, str) and value and start[0] == end[0]:
            new = old[0] + "XX" + old[1:-1] + "XX" + old[-1] if old[:1] in "'\"" else None
        else:
            new = None
        if new is not None:
            self.add(start, end, old, new)


def find_mutants(path: str) -> list[Mutant]:
    source = (REPO / path).read_text()
    finder = Finder(path, source)
    finder.visit(ast.parse(source))
    skip, only = tuple(EXCLUDED.get(path, {})), ONLY.get(path)
    return [m for m in finder.found if compiles(apply(source, m)) and not within(m.key.split("::")[1], skip)
            and (only is None or within(m.key.split("::")[1], only))]


def within(scope: str, names: tuple[str, ...]) -> bool:
    """`scope` (a dotted function name) is one of `names` or nested in one."""
    return any(scope == n or scope.startswith(n + ".") for n in names)


def apply(source: str, m: Mutant) -> str:
    lines = source.splitlines(keepends=True)
    (l0, c0), (l1, c1) = m.start, m.end
    return "".join(lines[:l0 - 1]) + lines[l0 - 1][:c0] + m.new + lines[l1 - 1][c1:] + "".join(lines[l1:])


def compiles(source: str) -> bool:
    try:
        compile(source, "<mutant>", "exec")
    except SyntaxError:
        return False
    return True


def listed(title: str) -> dict[str, str]:
    """KEY -> reason from the docs/testing.md section `## <title>` (lines "- `KEY` -- reason")."""
    text = DOCS.read_text() if DOCS.exists() else ""
    if f"## {title}\n" not in text:
        return {}
    section = text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^- `([^`]+)` -- (.+)$", section, re.M)}


# ---------------------------------------------------------------------------------------- running

def snapshot(dest: Path) -> None:
    """Copy the tracked and untracked-but-not-ignored files of the checkout (no build outputs)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def run_tests(copy: Path, args: list[str]) -> int:
    """Fork a child that runs pytest in `copy`; returns its pid."""
    pid = os.fork()
    if pid:
        return pid
    os.setsid()  # its own process group, so a timeout can end it and everything it started
    try:
        os.chdir(copy)
        sys.path.insert(0, str(copy))  # the copy's isolocal, here and in the subprocesses tests start
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(copy), os.environ.get("PYTHONPATH")]))
        out = os.open(os.devnull, os.O_WRONLY)
        os.dup2(out, 1)
        os.dup2(out, 2)
        import pytest

        code = pytest.main(["-x", "-q", "-o", "addopts=", *PYTEST_LEAN, *args])
    except BaseException:
        code = 3
    os._exit(int(code))


def kill_tree(pid: int) -> None:
    """End a timed-out child and all its descendants (test subprocesses start their own sessions)."""
    import psutil

    try:
        procs = psutil.Process(pid).children(recursive=True) + [psutil.Process(pid)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


_VERSION = [1_000_000_000]  # modification time (s) of the next file version written


def write_version(path: Path, text: str) -> None:
    path.write_text(text)
    _VERSION[0] += 1
    os.utime(path, (_VERSION[0], _VERSION[0]))


def run_all(mutants: list[Mutant], jobs: int, timeouts: dict[str, float], work: Path, log,
            on_done: Callable[[], None]) -> None:
    """Run mutants on `jobs` copies at once; every copy holds at most one mutant at a time."""
    copies = [work / f"copy{j}" for j in range(jobs)]
    free, running = list(range(jobs)), {}  # pid -> (mutant, copy index, start, original source)
    queue, done = list(mutants), 0
    try:
        while queue or running:
            while queue and free:
                m, j = queue.pop(0), free.pop()
                target = copies[j] / m.path
                original = target.read_text()
                write_version(target, apply(original, m))
                running[run_tests(copies[j], MODULES[m.path])] = (m, j, time.monotonic(), original)
            time.sleep(0.05)
            for pid, (m, j, start, original) in list(running.items()):
                finished, status, usage = os.wait4(pid, os.WNOHANG)
                elapsed = time.monotonic() - start
                if not finished and elapsed < timeouts[m.path]:
                    continue
                if not finished:
                    kill_tree(pid)
                    _, status, usage = os.wait4(pid, 0)
                    m.status = "timeout"
                else:
                    code = os.waitstatus_to_exitcode(status)
                    m.status = "survived" if code == 0 else "killed" if code in KILLED_BY else f"error {code}"
                m.seconds, m.cpu = round(elapsed, 1), round(usage.ru_utime + usage.ru_stime, 1)
                write_version(copies[j] / m.path, original)
                free.append(j)
                del running[pid]
                done += 1
                log(f"[{done}/{len(mutants)}] {m.status:8s} {m.seconds:6.1f}s {m.cpu:6.1f}s cpu  {m.key}")
                on_done()
    finally:  # interrupted: end the test runs still going (the copies are removed by the caller)
        for pid in running:
            kill_tree(pid)
            os.waitpid(pid, 0)


def baseline(paths: list[str], work: Path, log) -> dict[str, float]:
    """Each module's tests on the unmutated copy: they must pass; their time sets the timeout."""
    seconds = {}
    for path in paths:
        start = time.monotonic()
        _, status = os.waitpid(run_tests(work / "copy0", MODULES[path]), 0)
        seconds[path] = time.monotonic() - start
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"the tests of {path} fail without any mutant: {' '.join(MODULES[path])}")
        log(f"baseline {path}: {seconds[path]:.1f}s")
    return seconds


# pytest exit codes that kill a mutant: tests failed (1), collection failed (2), or a named test could not be
# collected (4, "not found"), which the unmutated baseline could: the mutated module fails to import.
KILLED_BY = (1, 2, 4)
LISTS = {"equivalent": "Equivalent mutants", "cuda-only": "CUDA-only mutants"}  # status -> docs section


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--module", action="append", choices=sorted(MODULES), help="repeatable; default: all")
    parser.add_argument("--jobs", type=int, default=2, help="mutants run at once (default 2)")
    parser.add_argument("--timeout-factor", type=float, default=3.0,
                        help="a mutant times out after this many times its module's baseline, at least 30 s")
    parser.add_argument("--report", type=Path, default=REPO / "reports" / "mutation.json")
    parser.add_argument("--list", action="store_true", help="print the mutants and exit")
    parser.add_argument("--resume", action="store_true",
                        help="keep the outcomes already in --report (written after every mutant) and run the rest")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    paths = args.module or list(MODULES)
    mutants = [m for p in paths for m in find_mutants(p)]
    known = {key: status for status, title in LISTS.items() for key in listed(title)}
    for m in mutants:
        m.status = known.get(m.key, m.status)
    before = resume(mutants, args.report) if args.resume else 0.0  # wall seconds of the earlier sessions
    if args.list:
        for m in mutants:
            print(f"{m.path}:{m.line}  {m.key}" + (f"  [{m.status}]" if m.key in known else ""))
        print(f"{len(mutants)} mutants in {len(paths)} modules")
        note_stale(known, mutants, paths)
        return 0

    os.environ.update(OMP_NUM_THREADS="1", MPLBACKEND="Agg", DS_ACCELERATOR="cpu", PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    def stop(signum: int, _frame: object) -> None:  # clean up the copies and the test runs on kill
        print(f"tools/mutate.py: stopped by signal {signum}", file=sys.stderr, flush=True)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)
    started = time.monotonic()
    for name in PRELOAD:  # imported once here, inherited by every forked test run
        try:
            __import__(name)
        except ImportError:
            pass
    log = lambda msg: print(f"{time.monotonic() - started:7.0f}s {msg}", flush=True)  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="isolocal-mutate-") as tmp:
        work = Path(tmp)
        for j in range(args.jobs):
            snapshot(work / f"copy{j}")
        times = baseline(paths, work, log)
        timeouts = {p: max(30.0, args.timeout_factor * t) for p, t in times.items()}
        todo = [m for m in mutants if m.status == "pending"]
        run_all(todo, args.jobs, timeouts, work, log,
                lambda: save_report(args.report, mutants, before + time.monotonic() - started))
    return summarize(mutants, known, paths, before + time.monotonic() - started, args.report)


def note_stale(known: dict[str, str], mutants: list[Mutant], paths: list[str]) -> None:
    """Name the listed keys of these modules that match no mutant (code renamed, moved or gone)."""
    for key in sorted(k for k in set(known) - {m.key for m in mutants} if k.split("::")[0] in paths):
        print(f"note: docs/testing.md lists `{key}`, which is no longer a mutant")


def save_report(report: Path, mutants: list[Mutant], seconds: float) -> None:
    """Every mutant and its outcome so far, and the wall time of all sessions (atomic write)."""
    report.parent.mkdir(parents=True, exist_ok=True)
    tmp = report.with_suffix(".tmp")
    tmp.write_text(json.dumps({"seconds": seconds, "cpu_seconds": sum(m.cpu for m in mutants),
                               "mutants": [asdict(m) for m in mutants]}, indent=1))
    tmp.replace(report)


def resume(mutants: list[Mutant], report: Path) -> float:
    """Take the outcomes of an earlier, interrupted session from its report; returns its wall time."""
    if not report.exists():
        raise SystemExit(f"--resume: no report at {report}")
    state = json.loads(report.read_text())
    done = {m["key"]: m for m in state["mutants"] if m["status"] in ("killed", "survived", "timeout")}  # errors rerun
    for m in mutants:
        if m.status == "pending" and m.key in done:
            m.status, m.seconds, m.cpu = done[m.key]["status"], done[m.key]["seconds"], done[m.key]["cpu"]
    return float(state["seconds"])


def summarize(mutants: list[Mutant], known: dict[str, str], paths: list[str], seconds: float, report: Path) -> int:
    """Per-module table; the score counts neither equivalent nor CUDA-only mutants."""
    rows = []
    for path in paths:
        ms = [m for m in mutants if m.path == path]
        eq = sum(m.status == "equivalent" for m in ms)
        cuda = sum(m.status == "cuda-only" for m in ms)
        killed = sum(m.status in ("killed", "timeout") for m in ms)
        rows.append((path, len(ms), eq, cuda, killed, len(ms) - eq - cuda - killed))
    total = [sum(r[i] for r in rows) for i in range(1, 6)]
    width = max(len(r[0]) for r in rows + [("total",)])
    print(f"\n{'module':{width}}  mutants  equivalent  cuda-only  killed  survived  score")
    for path, n, eq, cuda, killed, survived in rows + [("total", *total)]:
        score = 100.0 * killed / max(n - eq - cuda, 1)
        print(f"{path:{width}}  {n:7d}  {eq:10d}  {cuda:9d}  {killed:6d}  {survived:8d}  {score:5.1f}%")
    cpu = sum(m.cpu for m in mutants)
    print(f"wall time {seconds / 60:.1f} min; test runs used {cpu / 60:.1f} CPU min "
          f"({cpu / 120:.1f} min on 2 otherwise idle cores)")
    survivors = [m for m in mutants if m.status not in ("killed", "timeout", *LISTS)]
    for m in survivors:
        print(f"SURVIVED ({m.status}) {m.path}:{m.line}  `{m.key}`")
    note_stale(known, mutants, paths)
    save_report(report, mutants, seconds)
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
