"""GPU readiness checked on CPU: no host syncs in the training step, fp32 targets under autocast,
compile without recompiles, pinned loaders, and imports without the optional packages."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import isolocal
import isolocal.models.encoder as mim
from isolocal.core import targets
from isolocal.config import to_dict
from isolocal.data import SyntheticImages, build_loader
from isolocal.eval.features import cuda_eval_precision
from isolocal.core.masking import visible_indices
from isolocal.config.load import load_run_config
from isolocal.testing.syncs import HostSyncCounter
from isolocal.config.toml import dumps_toml
from isolocal.train.step import backward_step

REPO = Path(isolocal.__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch(model: isolocal.StagewiseEncoder, b: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(b, model.cfg.in_chans, model.img_size, model.img_size, generator=g)
    return images, model.random_mask(b, generator=g)


# ---- the sync counter and the training step ----------------------------------------------------


def test_counter_sees_every_kind_of_host_read():
    x = torch.randn(4, 3)
    m = x > 0
    with HostSyncCounter() as syncs:
        x.sum().item()
        int(x.argmax())
        bool(m.any())
        x.tolist()
        x.cpu()
        torch.equal(x, x)
        x[m]
        torch.nonzero(m)
        x.sum(0)  # no read
        torch._assert_async(torch.tensor(True))  # checked on the device on CUDA: no read
    ops = [e.op for e in syncs.events]
    assert ops == ["aten._local_scalar_dense.default"] * 3 + [
        "Tensor.tolist", "Tensor.cpu", "aten.equal.default", "aten.index.Tensor", "aten.nonzero.default"]
    assert [e.floating for e in syncs.events] == [True, False, False, True, True, True, False, False]
    assert syncs.on_device() == []  # a CPU run: no tensor lives on an accelerator


@pytest.mark.parametrize("boundary", ["global", "isolated"])
@pytest.mark.parametrize("name", ["localmim_vit_nano", "localmim_swin_nano"])
def test_training_step_makes_no_host_sync(name, boundary):
    """ViT: no host read at all (before: 2 per micro-batch, `.any()` and `int(counts[0])` when
    selecting visible tokens). Swin: only its window planning reads the host mask (integer data),
    nothing floating-point is ever read (before: the same 32 reads after a `.cpu()` of the mask)."""
    torch.manual_seed(0)
    model = isolocal.create_model(name, boundary=boundary)
    images, mask = _batch(model)
    with HostSyncCounter() as syncs:
        losses = backward_step(model, images, mask)
    assert losses.shape == (model.num_stages,) and torch.isfinite(losses).all()
    if model.cfg.arch == "vit":
        assert syncs.events == []
    else:
        assert syncs.floating() == []
        assert syncs.events and all(e.dtype in (torch.bool, torch.int64) for e in syncs.events)
        assert "Tensor.cpu" not in syncs.by_op()  # a host mask is planned where it is, not copied


def test_vit_keep_count_comes_from_the_config_and_is_checked_on_device():
    model = isolocal.create_model("localmim_vit_nano")
    images, mask = _batch(model)
    assert model.num_visible == int((~mask[0]).sum()) == 16  # 64 tokens, ratio 0.75
    keep = model.prepare(images, mask).ctx.ids_keep
    assert keep.shape == (2, model.num_visible) and (~torch.gather(mask, 1, keep)).all()
    other = torch.zeros_like(mask)
    other[:, 20:] = True  # 20 visible tokens, not 16
    with pytest.raises(RuntimeError, match="every mask row must have 16 visible"):
        model.prepare(images, other)
    with pytest.raises(ValueError, match="same number of visible tokens"):  # without a keep count: read
        visible_indices(torch.tensor([[True, False], [False, False]]))


# ---- targets under autocast --------------------------------------------------------------------


@pytest.mark.parametrize("name,boundary", [("localmim_vit_nano", "isolated"), ("mae_vit_nano", "global")])
def test_targets_are_fp32_inside_a_bf16_training_step(monkeypatch, name, boundary):
    """The step runs under bf16 autocast; every target and loss weight is built with autocast off and
    equals the autocast-free one bit for bit (CUDA autocast would cast the pixel einsum to bf16)."""
    torch.manual_seed(0)
    model = isolocal.create_model(name, boundary=boundary)
    images, mask = _batch(model)
    seen: dict[str, list[bool]] = {}

    def spy(fn_name: str, module=targets):
        original = getattr(module, fn_name)

        def wrapped(*args, **kwargs):
            seen.setdefault(fn_name, []).append(torch.is_autocast_enabled("cpu"))
            return original(*args, **kwargs)
        monkeypatch.setattr(module, fn_name, wrapped)

    for fn_name in ("hog_histogram", "pixels", "pool_histogram", "finish_hog"):
        spy(fn_name)
    spy("regrid", mim)
    expected = model.target_bank(images)  # no autocast anywhere
    seen.clear()
    got = []
    model.target_bank.register_forward_hook(lambda mod, args, out: got.append(out))
    backward_step(model, images, mask, autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    kind = "pixels" if model.cfg.target == "pixels" else "hog_histogram"
    assert seen[kind] and seen["regrid"]
    assert not any(flag for flags in seen.values() for flag in flags), seen
    assert len(got) == 1 and all(a.dtype == torch.float32 and torch.equal(a, b) for a, b in zip(got[0], expected))


# ---- torch.compile -----------------------------------------------------------------------------


@pytest.mark.parametrize("boundary", ["global", "isolated"])
def test_compiled_stages_compile_once_and_eval_runs_eager(boundary):
    """Each stage's forward and head compile on the first training step only; eval forwards (features,
    k-NN, probes) stay eager and add no graph; losses equal the eager model's."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = isolocal.create_model("localmim_vit_nano", boundary=boundary)
    torch.manual_seed(0)
    eager = isolocal.create_model("localmim_vit_nano", boundary=boundary)
    counter = CompileCounter()
    model.compile_stages(backend=counter)
    frames = []
    for step in range(4):
        images, mask = _batch(model, seed=step)
        before = counter.frame_count
        losses = backward_step(model, images, mask)
        frames.append(counter.frame_count - before)
        assert torch.allclose(losses, backward_step(eager, images, mask), rtol=1e-6, atol=0)
    assert frames == [2 * model.num_stages, 0, 0, 0]  # forward + predict per stage, then never again
    model.eval()
    with torch.no_grad():
        model.encode(images)
        model.encode(images[:1])  # another batch size: still no graph
    model.train()
    backward_step(model, images, mask)
    assert counter.frame_count == 2 * model.num_stages
    assert not any("_orig_mod" in k for k in model.state_dict())


def test_compile_warns_and_stays_eager_for_swin():
    model = isolocal.create_model("localmim_swin_nano")
    with pytest.warns(UserWarning, match="not supported for Swin"):
        model.compile_stages(backend=CompileCounter())
    assert all("forward" not in vars(stage) for stage in model.stages)


# ---- data, eval, memory ------------------------------------------------------------------------


def test_loaders_pin_memory_when_cuda_is_available():
    loader = build_loader(SyntheticImages(8, 16, 1, num_classes=2, seed=0), 4, shuffle=True, seed=0)
    assert loader.pin_memory == torch.cuda.is_available()


def test_eval_precision_changes_nothing_on_cpu():
    precision = torch.get_float32_matmul_precision()
    with cuda_eval_precision(torch.device("cpu")):
        assert not torch.is_autocast_enabled("cpu")
        assert torch.get_float32_matmul_precision() == precision


# ---- optional packages -------------------------------------------------------------------------


def test_config_toml_is_written_without_tomli_w(monkeypatch):
    data = to_dict(load_run_config(None, ['model.boundary=["isolated", 0.5, "global"]']))
    with_tomli_w = dumps_toml(data)
    monkeypatch.setitem(sys.modules, "tomli_w", None)  # import tomli_w now raises ImportError
    text = dumps_toml(data)
    assert tomllib.loads(text) == tomllib.loads(with_tomli_w) == data
    with pytest.raises(ValueError, match="cannot write NoneType value None"):
        dumps_toml({"a": None})


@pytest.mark.slow
def test_cli_eval_and_benchmarks_run_without_tomli_w_and_deepspeed(tmp_path):
    """A GPU image without tomli-w and deepspeed: `info`, a 2-step pretrain, loading its checkpoint,
    the eval and analysis modules and the benchmarks all import and run (from the repository root)."""
    script = textwrap.dedent(f"""
        import sys
        sys.modules["tomli_w"] = None
        sys.modules["deepspeed"] = None
        from isolocal.cli import main
        assert main(["info", "--set", "preset=localmim_vit_nano", "--repeats", "1"]) == 0
        assert main(["pretrain", "--set", "data.name=synthetic", "data.synthetic_size=16", "train.batch_size=8",
                     "train.max_steps=2", "--out", {str(tmp_path / "run")!r}]) == 0
        import isolocal
        model = isolocal.load_checkpoint({str(tmp_path / "run" / "last.pt")!r})
        import isolocal.cli.analyze, isolocal.cli.eval, isolocal.eval.finetune, isolocal.eval.knn, isolocal.eval.linear
        import benchmarks.bench_models, benchmarks.bench_swin, benchmarks.bench_syncs
        benchmarks.bench_syncs.main(["--presets", "localmim_vit_nano", "--batch", "2", "--warmup", "0",
                                     "--steps", "1"])
        assert sys.modules["tomli_w"] is None and sys.modules["deepspeed"] is None
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = tomllib.loads((tmp_path / "run" / "config.toml").read_text())
    assert config["train"]["max_steps"] == 2
    assert "per stage" in proc.stdout and "global run: 2 steps" in proc.stdout
    assert "localmim_vit_nano   global            0" in proc.stdout  # the benchmark's ViT step: no sync


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without CUDA gets")
def test_gpu_script_stops_at_once_without_cuda():
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh")], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OUT": "/nonexistent-gpu-results"})
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "benchmarks/gpu.sh needs a CUDA device (torch.cuda.is_available() is False here); nothing was run"]


# ---- the trainer's and the pipeline's whole steps ------------------------------------------------


def _optimizer_steps(optimizers) -> list[torch.Tensor]:
    """The step counts of torch's non-fused optimizers: host tensors on a GPU run too (not syncs)."""
    return [s["step"] for opt in optimizers for s in opt.state.values()]


@pytest.mark.parametrize("name,boundary", [("localmim_vit_nano", "isolated"), ("localmim_vit_nano", "global"),
                                           ("localmim_swin_nano", "isolated")])
def test_a_non_logging_trainer_step_makes_no_host_sync(tmp_path, name, boundary):
    """The trainer's whole optimizer step (2 micro-batches, per-stage clipping, AdamW) leaves losses and
    norms on the device: no host read for ViT, none of floating-point data for Swin. The log reads them."""
    from isolocal.train.trainer import Trainer

    cfg = load_run_config(None, [f"preset={name!r}", f"model.boundary={boundary!r}", "data.name=synthetic",
                                 "data.synthetic_size=16", "train.batch_size=8", "train.accum_steps=2",
                                 "train.clip_grad=0.5"])
    cfg.out_dir = str(tmp_path)
    trainer = Trainer(cfg)
    try:
        micro = next(trainer.epoch_micro_batches())
        trainer.train_step(micro)  # the first step creates the optimizer state
        with HostSyncCounter(host=_optimizer_steps(trainer.optimizers)) as syncs:
            losses = trainer.train_step(micro)
        assert torch.isfinite(losses).all() and (trainer.grad_norms > 0).all()
        if name.startswith("localmim_vit"):
            assert syncs.events == []
        else:
            assert syncs.floating() == [] and "Tensor.cpu" not in syncs.by_op()
        with HostSyncCounter() as syncs:
            trainer.stage_values(losses)
        assert syncs.by_op() == {"Tensor.tolist": 2}  # the log step's reads: losses and norms
    finally:
        trainer.close()


PIPELINE_STEP_SCRIPT = """
import json, os, sys
import torch
import isolocal
from deepspeed.runtime.pipe.engine import PipelineEngine
from deepspeed.runtime.pipe.topology import PipeDataParallelTopology
from isolocal.train.pipeline.engine import build_engine
from isolocal.train.pipeline.module import StagePipe
from isolocal.train.pipeline.runner import init_distributed
from isolocal.testing.syncs import HostSyncCounter

init_distributed(torch.device("cpu"), 120)
executed = []
run_schedule = PipelineEngine._exec_schedule
def recording(engine, schedule):
    executed.append(type(schedule).__name__)
    executed.extend(sorted({type(cmd).__name__ for step in schedule.steps() for cmd in step}))
    return run_schedule(engine, schedule)
PipelineEngine._exec_schedule = recording
def no_hook(engine):  # a DeepSpeed whose train_batch no longer picks the schedule through this hook
    raise AssertionError("the isolated engine must not depend on _train_schedule")
out = {}
for name, boundary in [("localmim_vit_nano", "isolated"), ("localmim_vit_nano", "global"),
                       ("localmim_swin_nano", "isolated")]:
    torch.manual_seed(0)
    model = isolocal.create_model(name, boundary=boundary)
    pipe = StagePipe(model, PipeDataParallelTopology(num_pp=1, num_dp=1))
    opt = torch.optim.AdamW([q for q in pipe.parameters() if q.requires_grad], lr=1e-3)
    engine = build_engine(pipe, opt, 2, 2, "auto", 0.5)
    original_hook = PipelineEngine._train_schedule
    if boundary == "isolated":
        PipelineEngine._train_schedule = no_hook
    g = torch.Generator().manual_seed(0)
    micro = lambda: [(torch.randn(2, 1, 32, 32, generator=g), model.random_mask(2, generator=g)) for _ in range(2)]
    engine.train_batch(pipe.batches(micro(), torch.zeros(1)))  # the first step creates the optimizer state
    executed.clear()
    steps = [s["step"] for s in opt.state.values()]
    loaded, planned = micro(), []
    prepare = model.prepare
    model.prepare = lambda images, mask, stages, **kw: planned.append(mask) or prepare(images, mask, stages, **kw)
    with HostSyncCounter(host=steps) as syncs:
        engine.train_batch(pipe.batches(loaded, torch.zeros(1)))
    model.prepare = prepare
    PipelineEngine._train_schedule = original_hook
    out[f"{name} {boundary}"] = {"engine": type(engine).__name__, "executed": list(executed),
                                 "events": [[e.op, str(e.dtype)] for e in syncs.events],
                                 "floating": len(syncs.floating()), "norms_device": str(engine.grad_norms.device),
                                 "losses": pipe.pop_loss_sums().tolist(),
                                 "host_masks_planned": [m is mask for m, (_, mask) in zip(planned, loaded)]}
json.dump(out, open(sys.argv[1], "w"))
"""


@pytest.mark.slow
def test_a_pipeline_step_makes_no_host_sync_and_runs_the_isolated_schedule(tmp_path):
    """A whole `train_batch` of a real one-rank DeepSpeed engine (load, forward, local backward,
    per-stage norms and clipping, AdamW): no host read for ViT (before: the norms' `.cpu()` per step,
    and on a GPU a pageable copy of `torch.tensor([k])` per stage and micro-batch, which a CPU run
    cannot see; AdamW's host step counts are not syncs), none of floating-point data for Swin, which plans its windows from the loader's host mask
    (on a GPU, the device copy would be read back once per micro-batch). The isolated engine runs its own schedule even when
    DeepSpeed's `train_batch` hook `_train_schedule` is gone; the default engine runs DeepSpeed's."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, "-c", PIPELINE_STEP_SCRIPT, str(result)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(result.read_text())
    vit, vit_global, swin = out.values()
    assert vit["events"] == [] and vit_global["events"] == []
    assert swin["floating"] == 0 and ["Tensor.cpu", "torch.float32"] not in swin["events"]
    for case in (vit, swin):
        assert case["engine"] == "IsolatedScheduleEngine"
        assert case["executed"] == ["IsolatedSchedule", "ForwardPass", "LoadMicroBatch", "LocalBackward",
                                    "OptimizerStep", "ReduceGrads"]
    assert vit_global["engine"] == "DefaultScheduleEngine" and "BackwardPass" in vit_global["executed"]
    assert all(case["norms_device"] == "cpu" and all(v > 0 for v in case["losses"]) for case in out.values())
    # the first rank plans from the loader's host masks, not from DeepSpeed's device copies
    assert all(case["host_masks_planned"] == [True, True] for case in out.values())


EARLY_REDUCE_SCRIPT = """
import sys, torch
import isolocal
from isolocal.train import distributed
from isolocal.train.step import backward_step

info = distributed.setup("cpu")
g = torch.Generator().manual_seed(info.rank)  # each rank its own images and masks
models = []
for _ in range(2):
    torch.manual_seed(0)
    models.append(isolocal.create_model("localmim_vit_nano", boundary="isolated"))
early, late = models
images = torch.randn(4, 1, 32, 32, generator=g)
mask = early.random_mask(4, generator=g)
params = [[[p for p in s.parameters() if p.requires_grad] for s in m.stages] for m in models]
order = []
for k, stage in enumerate(early.stages):
    stage.register_forward_hook(lambda mod, args, out, k=k: order.append(f"forward {k}"))
averager = distributed.GradientAverager(params[0], info.world)
def launch(k):
    order.append(f"reduce {k}")
    averager.launch(k)
for i in (0, 2):  # two micro-batches; the reduces start during the last one's backward
    backward_step(early, images[i:i + 2], mask[i:i + 2], accum=2, stage_done=launch if i == 2 else None)
    backward_step(late, images[i:i + 2], mask[i:i + 2], accum=2)
averager.finish()
distributed.average_gradients(params[1], info.world)  # all of them after the whole backward
same = all(torch.equal(a.grad, b.grad) for pa, pb in zip(*params) for a, b in zip(pa, pb))
torch.save({"order": order, "same": same}, f"{sys.argv[1]}/rank{info.rank}.pt")
distributed.teardown(info)
"""


@pytest.mark.slow
def test_isolated_data_parallel_reduces_start_after_each_stage_and_average_bit_identically(tmp_path):
    """2 gloo processes: with `stage_done` = `GradientAverager.launch`, stage k's all-reduce starts
    right after its backward of the last micro-batch, before stage k+1 runs, and the averaged
    gradients equal, bit for bit, those of one all-reduce per stage after the whole backward."""
    script = tmp_path / "early.py"
    script.write_text(EARLY_REDUCE_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port()), "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path)], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in (0, 1)]
    try:
        outputs = [p.communicate(timeout=300)[0].decode() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    for rank in (0, 1):
        out = torch.load(tmp_path / f"rank{rank}.pt")
        assert out["same"]
        assert out["order"] == [f"forward {k}" for k in range(4)] + [
            f"{what} {k}" for k in range(4) for what in ("forward", "reduce")]
