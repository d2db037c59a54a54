"""DeepSpeed pipeline: real engines on CPU (gloo), one subprocess per rank (tests/pipeline_worker.py).

Each launch costs seconds of imports per process on 2 cores, so checks are grouped: one 2-rank
launch of gradient cases with 2 pipeline ranks, one 2-rank launch of runner runs of one config also
run by the single-process trainer (logs, checkpoint conversion, resume, start from a single-process
checkpoint), one 4-rank launch (4 pipeline ranks; 2 ranks x 2 replicas), one 2-rank launch with a
rank killed mid-run. References are computed here, in one process, from the same seed, data and
masks.
"""
from __future__ import annotations

import inspect
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import isolocal
from isolocal.config import RunConfig, from_dict, to_dict
from isolocal.config.load import load_run_config
from isolocal.io.checkpoint import LAST, load_model_state, pipeline_state_dict
from isolocal.testing.runs import assert_close_states
from isolocal.train import train
from isolocal.train.pipeline.engine import (ENGINES, IsolatedSchedule, IsolatedScheduleEngine, LocalBackward,
                                            build_engine)
from isolocal.train.pipeline.runner import eval_batches
from isolocal.train.pipeline.timing import CATEGORIES

sys.path.insert(0, str(Path(__file__).parent))
from pipeline_worker import PRESET, STEPS, case_data, make_optimizer, parse_case  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).parent / "pipeline_worker.py"
TOL = 1e-5

CASES_2 = ["2,1,1,global,auto,0", "2,1,3,global,auto,0", "2,1,1,isolated,auto,0", "2,1,3,isolated,auto,0",
           "2,1,2,isolated,default,0", "2,1,2,global,auto,0.05"]
CASES_4 = ["4,1,2,global,auto,0", "4,1,5,global,auto,0", "4,1,2,isolated,auto,0", "4,1,5,isolated,auto,0",
           "2,2,2,global,auto,0", "2,2,2,isolated,auto,0",
           "4,1,2,global,auto,0,localmim_swin_nano", "4,1,2,isolated,auto,0,localmim_swin_nano"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(n: int, out: Path, spec: dict) -> list[subprocess.Popen]:
    """n worker processes wired like torchrun would (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*)."""
    port = free_port()
    procs = []
    for rank in range(n):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(n), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "DS_ACCELERATOR": "cpu", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        log = open(out / f"log_rank{rank}.txt", "w")
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(out), json.dumps(spec)], env=env,
                                      stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    return procs


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[int | None]:
    """Exit codes (None: still running at the deadline, then killed with its process group)."""
    deadline = time.monotonic() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(deadline - time.monotonic(), 0.1)))
        except subprocess.TimeoutExpired:
            codes.append(None)
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    return codes


def launch(n: int, out: Path, spec: dict, timeout: float = 180) -> None:
    out.mkdir(parents=True, exist_ok=True)
    codes = wait_all(start_ranks(n, out, spec), timeout)
    logs = "\n".join((out / f"log_rank{r}.txt").read_text()[-3000:] for r in range(n))
    assert codes == [0] * n, f"exit codes {codes}\n{logs}"


def assert_pipeline_equals_single_process(tmp_path: Path, overrides: list[str]) -> dict[str, dict]:
    """Train `overrides` (2 micro-batches per step) in one process (accumulating them) and as a 2-rank
    pipeline, isolated and global: the final parameters and buffers agree to 1e-5 (relative) and so do
    the logged per-stage losses of every step. Returns the single-process states by boundary."""
    runs, states = [], {}
    for boundary in ("isolated", "global"):
        opts = [*overrides, f"model.boundary={boundary!r}"]
        single = load_run_config(None, [*opts, "train.accum_steps=2", f"out_dir='{tmp_path / f'single_{boundary}'}'"])
        train(single)
        runs.append([to_dict(load_run_config(None, [*opts, "pipeline.stages=2",
                                                    f"out_dir='{tmp_path / f'pipe_{boundary}'}'"])), False, None])
    launch(2, tmp_path / "launch", {"runs": runs})
    for boundary in ("isolated", "global"):
        expected = states[boundary] = load_model_state(tmp_path / f"single_{boundary}" / LAST)[1]
        assert_close_states(expected, load_model_state(tmp_path / f"pipe_{boundary}")[1], where=boundary)
        logs = [pd.read_json(tmp_path / f"{run}_{boundary}" / "metrics.jsonl", lines=True).query("kind == 'step'")
                for run in ("single", "pipe")]
        single_losses, pipe_losses = (np.array(log["loss_stage"].tolist()) for log in logs)
        assert len(single_losses) == 3 and np.allclose(single_losses, pipe_losses, rtol=1e-5, atol=0), boundary
    return states


def merged(out: Path, n: int) -> dict:
    """Per case: the engine class per rank, gradients per step and final parameters over all ranks,
    and per rank (replica, holds the last stage, the loss `train_batch` reported at each step)."""
    results: dict = {}
    for rank in range(n):
        for case, r in torch.load(out / f"grads_rank{rank}.pt").items():
            entry = results.setdefault(case, {"engines": set(), "grads": [{} for _ in r["grads"]], "params": {},
                                              "reported": []})
            entry["engines"].add(r["engine"])
            for step, grads in enumerate(r["grads"]):
                entry["grads"][step].update(grads)
            entry["params"].update(r["params"])
            entry["reported"].append(r["reported"])
            entry.setdefault("sending", []).extend(r["sending"])
            entry.setdefault("training", []).extend(r["training"])
    return results


def reference(case: str) -> dict:
    """Single process: the sum of local losses (detached at boundaries when isolated), averaged over
    micro-batches, each replica's gradient computed alone and then averaged, as data parallelism does."""
    p, dp, m, boundary, _, clip, preset = parse_case(case)
    torch.manual_seed(0)
    model = isolocal.create_model(preset, boundary=boundary)
    named = {n: q for n, q in model.named_parameters() if q.requires_grad}
    optimizer = make_optimizer(list(named.values()))
    grads, losses = [], []
    for step in case_data(model, dp, m):
        per_replica = []
        losses.append([])
        for replica in step:
            optimizer.zero_grad()
            losses[-1].append(0.0)
            for images, mask in replica:
                loss = model(images, mask).loss / m
                loss.backward()
                losses[-1][-1] += loss.item()
            per_replica.append({n: q.grad.clone() for n, q in named.items()})
        for n, q in named.items():
            q.grad = sum(g[n] for g in per_replica) * (1.0 / dp)
        if clip > 0:
            for stage in model.stages:
                torch.nn.utils.clip_grad_norm_([q for q in stage.parameters() if q.requires_grad], clip)
        grads.append({n: q.grad.clone() for n, q in named.items()})
        optimizer.step()
    return {"grads": grads, "params": {n: q.detach().clone() for n, q in named.items()}, "losses": losses}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def max_rel(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(rel(a[n], b[n]) for n in b)


def check_against_reference(results: dict) -> None:
    for case, got in results.items():
        ref = reference(case)
        _, _, _, boundary, schedule, _, _ = parse_case(case)
        engine = "IsolatedScheduleEngine" if boundary == "isolated" and schedule == "auto" else "DefaultScheduleEngine"
        assert got["engines"] == {engine}, case
        assert len(got["grads"]) == STEPS
        for step in range(STEPS):
            assert max_rel(got["grads"][step], ref["grads"][step]) < TOL, (case, step)
        assert max_rel(got["params"], ref["params"]) < TOL, case
        check_reported_losses(got["reported"], ref["losses"], isolated=engine == "IsolatedScheduleEngine")
        assert set(got["sending"]) == {0}, case  # every batch ends with its sends finished (gloo drops the rest)
        assert set(got["training"]) == {True}, case  # trained in training mode after an eval-mode module


def check_reported_losses(reported: list, reference_losses: list, isolated: bool) -> None:
    """What `train_batch` returns: DeepSpeed's default schedule gives every rank the loss averaged over
    micro-batches and replicas; the isolated schedule gives it to the last rank alone, for its own
    replica (NaN elsewhere: no pipeline-wide broadcast)."""
    for replica, last, losses in reported:
        for step, loss in enumerate(losses):
            per_replica = reference_losses[step]
            if isolated and not last:
                assert math.isnan(loss)
            else:
                expected = per_replica[replica] if isolated else sum(per_replica) / len(per_replica)
                assert loss == pytest.approx(expected, rel=TOL)


def check_modes_differ(results: dict, global_case: str, isolated_case: str) -> None:
    """Lower stages get other gradients in the two modes; the top stage (own loss only) the same."""
    g, i = results[global_case]["grads"][0], results[isolated_case]["grads"][0]
    for name in g:
        diff = rel(i[name], g[name])
        if name.startswith("stages.3."):
            assert diff < TOL, name
        elif ".blocks." in name and "decoder" not in name:
            assert diff > 0.05, name


@pytest.fixture(scope="module")
def two_rank_grads(tmp_path_factory) -> Path:
    """One 2-rank launch of the gradient cases (its own launch, so that it is also a quick check of the
    engines alone: `tools/mutate.py` runs it for every mutant of the engine module)."""
    out = tmp_path_factory.mktemp("pipe2grads")
    launch(2, out, {"grads": CASES_2})
    return out


@pytest.fixture(scope="module")
def two_rank_launch(tmp_path_factory) -> tuple[Path, list]:
    """The single-process trainer's run of a config, then one 2-rank launch of pipeline runs of the
    same config (isolated, cost partition and profiled; interrupted + resumed; started from the
    trainer's checkpoint; global).
    Returns the directory and the trainer's micro-batches (images, mask)."""
    out = tmp_path_factory.mktemp("pipe2")
    base = load_run_config(None, ["preset=" + PRESET, "data.name=synthetic", "data.synthetic_size=64",
                                  "train.batch_size=16", "train.epochs=2", "train.log_every=1",
                                  "train.warmup_epochs=0.5", "train.base_lr=0.01", "pipeline.stages=2",
                                  "pipeline.micro_batches=2", "pipeline.timeout_s=60", "model.boundary=isolated"])

    def cfg(name: str, **train) -> dict:
        d = to_dict(base)
        d["out_dir"] = str(out / name)
        d["train"].update(train)
        return d

    single = cfg("single", accum_steps=2)
    single["pipeline"]["stages"] = 0
    micro_batches: list = []
    train(from_dict(RunConfig, single), on_batch=lambda x, mask: micro_batches.append((x.clone(), mask.clone())))
    glob = cfg("global", epochs=1)
    glob["model"]["boundary"] = "global"
    full = cfg("full")
    full["pipeline"].update(partition="cost", profile=True)  # neither changes a loss
    runs = [[full, False, None], [cfg("cut", max_steps=6), False, None], [cfg("cut"), True, None],
            [cfg("init", max_steps=1), False, str(out / "single" / LAST)], [glob, False, None]]
    launch(2, out, {"runs": runs})
    return out, micro_batches


@pytest.mark.slow
def test_two_ranks_match_single_process_gradients_and_params(two_rank_grads):
    results = merged(two_rank_grads, 2)
    assert set(results) == set(CASES_2)
    check_against_reference(results)
    check_modes_differ(results, "2,1,3,global,auto,0", "2,1,3,isolated,auto,0")


@pytest.mark.slow
def test_four_ranks_and_data_parallel_match_single_process(tmp_path):
    launch(4, tmp_path, {"grads": CASES_4})
    results = merged(tmp_path, 4)
    assert set(results) == set(CASES_4)
    check_against_reference(results)
    check_modes_differ(results, "4,1,5,global,auto,0", "4,1,5,isolated,auto,0")
    check_modes_differ(results, "2,2,2,global,auto,0", "2,2,2,isolated,auto,0")
    check_modes_differ(results, "4,1,2,global,auto,0,localmim_swin_nano", "4,1,2,isolated,auto,0,localmim_swin_nano")


def single_process_eval(run_dir: Path) -> tuple[float, list[float]]:
    """Eval loss of the run's checkpoint, loaded as the single-process model, on the held-out micro-batches."""
    cfg, state = load_model_state(run_dir)  # the pipeline directory, read directly
    model = isolocal.load_checkpoint(run_dir)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    m = cfg.pipeline.micro_batches
    batches = eval_batches(cfg, model, cfg.train.batch_size // m, m)
    with torch.no_grad():
        losses = torch.stack([torch.stack(model(x, mask).losses) for x, mask in batches]).mean(0)
    return float(losses.sum()), losses.tolist()


@pytest.mark.slow
@pytest.mark.parametrize("run", ["full", "global"])
def test_runner_logs_and_loaded_checkpoint_reproduces_eval_loss(two_rank_launch, run):
    out = two_rank_launch[0]
    log = pd.read_json(out / run / "metrics.jsonl", lines=True)
    steps = log[log.kind == "step"]
    assert steps.step.tolist() == list(range(8 if run == "full" else 4))
    for rec in steps.itertuples():
        assert len(rec.loss_stage) == len(rec.grad_norm_stage) == len(rec.lr_stage) == 4
        assert all(n > 0 for n in rec.grad_norm_stage) and math.isclose(rec.loss, sum(rec.loss_stage))
        assert rec.img_per_s > 0 and rec.peak_mem_mb >= 0
    assert steps.loss.iloc[-1] < steps.loss.iloc[0]
    assert (log.kind == "epoch").sum() == (2 if run == "full" else 1)
    (ev,) = log[log.kind == "eval"].itertuples()
    loss, per_stage = single_process_eval(out / run)
    assert math.isclose(ev.loss, loss, rel_tol=TOL)
    assert all(math.isclose(a, b, rel_tol=TOL) for a, b in zip(ev.loss_stage, per_stage))
    if run == "full":
        check_profile(out, out / run)
    if run == "global":  # the last run of the launch returned its summary
        summary = json.loads((out / "runs_rank0.json").read_text())
        assert summary["mode"] == "global" and summary["steps"] == 4
        assert math.isclose(summary["eval_loss"], ev.loss)


def check_profile(out: Path, run_dir: Path) -> None:
    """`pipeline.partition = "cost"` printed its choice; `pipeline.profile` wrote every rank's
    breakdown (whole steps from step 2 of 8, every category timed on the rank that does it), a
    trace with both ranks and its figure."""
    log = (out / "log_rank0.txt").read_text()
    assert "isolocal pipeline: partition by measured cost: rank 0: stages 0-" in log
    assert "balance bound" in log and "isolocal pipeline: per-rank time" in log
    table = pd.read_json(run_dir / "pipeline_profile.json")
    assert table["rank"].tolist() == [0, 1] and (table.steps == 5).all()
    assert (table[["targets", "forward", "backward", "optimizer", "step_ms"]] > 0).all().all()
    first, last = table.iloc[0], table.iloc[1]
    assert first.data > 0 and first.send > 0 and first.recv == 0
    assert last.data == 0 and last.send == 0 and last.recv > 0
    assert (table.step_ms - table[["data", "targets", "forward", "backward", "optimizer", "send", "recv", "sync",
                                   "other"]].sum(axis=1)).abs().max() < 1e-6
    trace = json.loads((run_dir / "pipeline_trace.json").read_text())["traceEvents"]
    assert {e["pid"] for e in trace if e["ph"] == "X"} == {0, 1}
    assert (run_dir / "pipeline_timeline.png").stat().st_size > 0


def step_log(run_dir: Path) -> pd.DataFrame:
    log = pd.read_json(run_dir / "metrics.jsonl", lines=True)
    return log[log.kind == "step"].reset_index(drop=True)


@pytest.mark.slow
def test_pipeline_run_follows_the_single_process_trainer_step_by_step(two_rank_launch):
    """Same config, pipeline.micro_batches = train.accum_steps: same data, masks, lr, losses."""
    out, _ = two_rank_launch
    single, pipe = step_log(out / "single"), step_log(out / "full")
    assert pipe.step.tolist() == single.step.tolist() == list(range(8))
    assert pipe.lr.tolist() == pytest.approx(single.lr.tolist(), rel=1e-12)
    for a, b in zip(pipe.loss_stage, single.loss_stage):
        assert a == pytest.approx(b, rel=TOL)
    for a, b in zip(pipe.grad_norm_stage, single.grad_norm_stage):
        assert a == pytest.approx(b, rel=TOL)


@pytest.mark.slow
def test_single_process_checkpoint_starts_a_pipeline_run(two_rank_launch):
    """A run started from the trainer's final checkpoint: its first loss is that model's loss on the
    first micro-batches (the same ones the trainer's first step drew)."""
    out, micro_batches = two_rank_launch
    model = isolocal.load_checkpoint(out / "single" / LAST)
    with torch.no_grad():
        expected = torch.stack([torch.stack(model(x, mask).losses) for x, mask in micro_batches[:2]]).mean(0)
    (first,) = step_log(out / "init").loss_stage
    assert first == pytest.approx(expected.tolist(), rel=TOL)
    assert sum(first) < step_log(out / "full").loss[0] * 0.9  # a trained start, not a fresh one


@pytest.mark.slow
def test_resumed_run_ends_where_the_uninterrupted_run_ends(two_rank_launch):
    full, cut = two_rank_launch[0] / "full", two_rank_launch[0] / "cut"
    a, b = pipeline_state_dict(full / "pipeline"), pipeline_state_dict(cut / "pipeline")
    assert a.keys() == b.keys()
    assert max(rel(b[k], a[k]) for k in a if a[k].is_floating_point() and a[k].norm() > 0) < TOL
    log_a, log_b = step_log(full), step_log(cut)
    assert log_b.step.tolist() == list(range(8))  # the resumed run rewrote nothing twice
    assert log_b.loss.tolist() == pytest.approx(log_a.loss.tolist(), rel=TOL)
    tags = sorted(p.name for p in (cut / "pipeline").iterdir() if p.is_dir())
    assert tags == ["step_00000006", "step_00000008"]  # keep_last = 2


@pytest.mark.slow
def test_killed_rank_ends_the_run_with_a_clear_error_within_the_timeout(tmp_path):
    timeout_s = 20
    cfg = load_run_config(None, ["preset=" + PRESET, "data.name=synthetic", "data.synthetic_size=64",
                                 "train.batch_size=16", "train.epochs=1000", "train.log_every=1",
                                 "pipeline.stages=2", f"pipeline.timeout_s={timeout_s}", f"out_dir={tmp_path / 'run'}"])
    procs = start_ranks(2, tmp_path, {"runs": [[to_dict(cfg), False, None]]})
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "the run never got going"
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    codes = wait_all(procs, timeout_s + 10)
    assert codes[0] not in (None, 0) and time.monotonic() - killed < timeout_s
    log = (tmp_path / "log_rank0.txt").read_text()
    assert "isolocal pipeline: rank 0 of 2 failed" in log and "connection" in log.lower()


def test_isolated_schedule_only_sends_forward_and_holds_two_micro_batches():
    for stages in (1, 2, 4):
        for stage_id in range(stages):
            sched = IsolatedSchedule(micro_batches=5, stages=stages, stage_id=stage_id)
            cmds = [c for step in sched.steps() for c in step]
            names = [type(c).__name__ for c in cmds]
            assert not {"SendGrad", "RecvGrad", "BackwardPass"} & set(names)
            assert names.count("ForwardPass") == names.count("LocalBackward") == 5
            assert names.count("SendActivation") == (0 if stage_id == stages - 1 else 5)
            assert names[-2:] == ["ReduceGrads", "OptimizerStep"]
            assert sched.num_pipe_buffers() == 2
            assert {c.buffer_id for c in cmds if isinstance(c, LocalBackward)} == {0, 1}
            # each micro-batch's backward runs before the next micro-batch is received or loaded
            order = [n for n in names if n in ("ForwardPass", "LocalBackward")]
            assert order == ["ForwardPass", "LocalBackward"] * 5


class TimedRecorder:
    """`RankTimes.timed`'s interface: records (category, handler name) and leaves the handler as it is."""

    def __init__(self):
        self.calls: list[tuple[str, str]] = []

    def timed(self, category: str, fn):
        self.calls.append((category, fn.__name__))
        return fn


def test_profiling_times_every_instruction_and_the_isolated_ranks_own_waits_in_known_categories():
    """`pipeline.profile`: each engine times every instruction in a `RankTimes` category (time in any other
    name would fall into "other"); the isolated engine also times its local backwards and, on every rank
    but the last, the wait for its last send."""
    for engine_class in ENGINES.values():
        for stage_id in (0, 1):
            engine = engine_class.__new__(engine_class)  # no process group: only the profiling wiring
            engine.stage_id, engine.num_stages = stage_id, 2
            times = TimedRecorder()
            engine.profile(times)
            assert vars(engine)["_INSTRUCTION_MAP"].keys() == engine_class._INSTRUCTION_MAP.keys()
            assert len(times.calls) >= len(engine_class._INSTRUCTION_MAP)
            assert {category for category, _ in times.calls} <= set(CATEGORIES)
            own = [call for call in times.calls if call[1] in ("_backward_local", "_finish_send")]
            if engine_class is IsolatedScheduleEngine:
                assert own == [("backward", "_backward_local")] + ([("send", "_finish_send")] if stage_id == 0 else [])
            else:
                assert own == []


def test_build_engine_defaults_to_the_auto_schedule_without_clipping():
    defaults = {n: p.default for n, p in inspect.signature(build_engine).parameters.items()}
    assert defaults["schedule_name"] == "auto" and defaults["clip_grad"] == 0.0
    assert {name: engine.__name__ for name, engine in ENGINES.items()} == {
        "isolated": "IsolatedScheduleEngine", "1f1b": "DefaultScheduleEngine"}


def test_bad_pipeline_settings_fail_before_any_work(monkeypatch):
    from isolocal.config import ConfigError
    from isolocal.train.pipeline.runner import check_launch

    cfg = load_run_config(None, ["pipeline.stages=2"])
    with pytest.raises(ConfigError, match="torchrun"):
        check_launch(cfg)
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ConfigError, match="multiple of pipeline.stages"):
        check_launch(cfg)
    with pytest.raises(ConfigError, match="between 1 and the model's 4 stages, got 5"):
        check_launch(load_run_config(None, ["pipeline.stages=5"]))
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match="divisible by pipeline.micro_batches"):
        check_launch(load_run_config(None, ["pipeline.stages=2", "train.batch_size=12", "pipeline.micro_batches=4"]))
    assert check_launch(load_run_config(None, ["pipeline.stages=2", "train.batch_size=16"])) == (2, 2)
    with pytest.raises(ConfigError, match=r"^train.compile = true is not supported by the pipeline runner"):
        check_launch(load_run_config(None, ["pipeline.stages=2", "train.batch_size=16", "train.compile=true"]))
    with pytest.raises(ValueError, match="pipeline.schedule 'isolated' .* needs every model.boundary isolated"):
        check_launch(load_run_config(None, ["pipeline.stages=2", "train.batch_size=16", "pipeline.schedule='isolated'",
                                            "model.boundary='global'"]))


RNG_RESUME_SCRIPT = """
import sys
import torch
from isolocal.io.checkpoint import run_state
from isolocal.train.pipeline.runner import PipelineRun
from isolocal.config.load import load_run_config

cfg = load_run_config(None, sys.argv[2:])
cfg.out_dir = sys.argv[1]
run = PipelineRun(cfg)
run.fit()
def states(run):
    out = {"torch": torch.get_rng_state(), "mask_generator": run.mask_gen.get_state()}
    if run.device.type == "cuda":  # drop path on a GPU draws from the CUDA generator
        out["cuda"] = torch.cuda.get_rng_state(run.device)
    return out
at_save = states(run)
run.close()
torch.manual_seed(123)  # move every stream on, as a fresh process's would be
if torch.cuda.is_available():
    torch.cuda.manual_seed_all(123)
resumed = PipelineRun(cfg, resume=True)
torch.save({"at_save": at_save, "resumed": states(resumed), "step": resumed.step,
            "saved": run_state(resumed.resume_path)["ranks"][0]}, sys.argv[1] + "/rng.pt")
"""


@pytest.mark.slow
def test_pipeline_resume_restores_every_rng_state_it_uses(tmp_path):
    """A one-rank pipeline run with drop path: its checkpoint holds the torch CPU RNG, the mask
    generator and (on CUDA) the CUDA RNG, and a resumed run starts from exactly those states."""
    overrides = ["data.name=synthetic", "data.synthetic_size=48", "train.batch_size=8", "train.max_steps=2",
                 "model.boundary='isolated'", "model.drop_path_rate=0.2", "pipeline.stages=1",
                 "pipeline.micro_batches=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-c", RNG_RESUME_SCRIPT, str(tmp_path), *overrides], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = torch.load(tmp_path / "rng.pt", weights_only=False)
    assert out["step"] == 2
    assert out["at_save"].keys() == out["resumed"].keys() >= {"torch", "mask_generator"}
    for name, state in out["at_save"].items():
        assert torch.equal(out["resumed"][name], state), name
        assert torch.equal(out["saved"][name], state), name
    assert "cuda" in out["saved"]  # the CUDA state's slot (None on a CPU run)
