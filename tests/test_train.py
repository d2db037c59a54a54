"""The trainer: exact resume, crash-safe checkpoints, shared masks across modes, isolated memory, DDP."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch

import isolocal
from isolocal.config import ConfigError, RunConfig
from isolocal.config.load import load_run_config
from isolocal.io.checkpoint import LAST, atomic_save, epoch_checkpoints, load_state, save_checkpoint
from isolocal.models.encoder import StagewiseEncoder
from isolocal.testing.launch import free_port, torchrun_two
from isolocal.testing.runs import untimed
from isolocal.train import Trainer, distributed, train
from isolocal.train.optim import build_optimizers, build_scheduler

REPO = Path(isolocal.__file__).resolve().parents[1]
TINY = ["data.name=synthetic", "data.synthetic_size=48", "train.batch_size=8", "train.epochs=2",
        "train.log_every=1", "train.warmup_epochs=0.5"]  # nano preset: 4 stages, 32 px, 64 tokens


def tiny(out: Path, *overrides: str) -> RunConfig:
    cfg = load_run_config(None, [*TINY, *overrides])
    cfg.out_dir = str(out)
    return cfg


def records(out: Path, kind: str = "step") -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------------------------------- resume

@pytest.mark.parametrize("boundary", ["global", "isolated"])
def test_resume_gives_the_uninterrupted_losses(tmp_path, boundary):
    """Stopped mid-epoch twice and resumed: every step's losses equal the uninterrupted run's, bit for bit."""
    opts = [f"model.boundary={boundary!r}", "train.accum_steps=2"]  # 6 steps per epoch, 12 in all
    train(tiny(tmp_path / "whole", *opts))
    train(tiny(tmp_path / "parts", *opts, "train.max_steps=4"))
    assert load_state(tmp_path / "parts" / LAST)["step"] == 4
    train(tiny(tmp_path / "parts", *opts, "train.max_steps=9"), resume=True)
    train(tiny(tmp_path / "parts", *opts), resume=True)

    whole, parts = records(tmp_path / "whole"), records(tmp_path / "parts")
    assert [r["step"] for r in parts] == list(range(12))
    for a, b in zip(whole, parts):
        assert (a["loss_stage"], a["lr"], a["grad_norm_stage"]) == (b["loss_stage"], b["lr"], b["grad_norm_stage"])
    epochs = [(r["epoch"], r["loss_stage"]) for r in records(tmp_path / "whole", "epoch")]
    assert epochs == [(r["epoch"], r["loss_stage"]) for r in records(tmp_path / "parts", "epoch")]
    assert_same_weights(load_state(tmp_path / "whole" / LAST)["model"], load_state(tmp_path / "parts" / LAST)["model"])


def test_prefetched_batches_train_exactly_like_in_process_ones(tmp_path):
    """Augmented Fashion-MNIST prepared by the background process: every log record equals the
    in-process run's, across an epoch boundary and a mid-epoch resume."""
    fmnist = ["data.name=fashion_mnist", "data.train_subset=64", "train.batch_size=16", "train.epochs=2",
              "train.log_every=1", "model.boundary='isolated'"]
    whole, parts = tmp_path / "in_process", tmp_path / "prefetched"
    train(tiny(whole, *fmnist, "data.prefetch=false"))
    train(tiny(parts, *fmnist, "data.prefetch=true", "train.max_steps=3"))
    train(tiny(parts, *fmnist, "data.prefetch=true"), resume=True)
    assert untimed(whole) == untimed(parts) and len(records(whole)) == 8


KILL_SCRIPT = """
import os, signal, sys
from isolocal.config.load import load_run_config
from isolocal.train import train
cfg = load_run_config(None, sys.argv[3:])
cfg.out_dir = sys.argv[1]
seen = []
def die_at(images, mask):
    seen.append(1)
    if len(seen) == int(sys.argv[2]):
        os.kill(os.getpid(), signal.SIGKILL)
train(cfg, on_batch=die_at)
"""


def test_a_killed_run_resumes_exactly(tmp_path):
    """SIGKILL in epoch 2 (6 steps per epoch): resume redoes it from epoch 1's checkpoint, dropping
    the log records past the checkpoint, and ends exactly where an uninterrupted run ends."""
    out = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(out), "9", *TINY], cwd=REPO, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert [r["step"] for r in records(out)] == list(range(8)) and load_state(out / LAST)["step"] == 6
    train(tiny(out), resume=True)
    train(tiny(tmp_path / "whole"))
    timeless = [untimed(tmp_path / "whole"), untimed(out)]
    assert timeless[0] == timeless[1] and len(timeless[0]) == 12 + 2
    assert_same_weights(load_state(tmp_path / "whole" / LAST)["model"], load_state(out / LAST)["model"])


def test_a_max_steps_run_logs_its_final_step_and_logging_changes_no_loss(tmp_path):
    """max_steps = 5 is no multiple of log_every = 3: steps 0 and 3 are log steps and 4, the last, is
    logged too, with the losses every step of a log_every = 1 run has (logging reads, never trains)."""
    train(tiny(tmp_path / "sparse", "train.max_steps=5", "train.log_every=3"))
    train(tiny(tmp_path / "dense", "train.max_steps=5"))
    sparse, dense = records(tmp_path / "sparse"), records(tmp_path / "dense")
    assert [r["step"] for r in sparse] == [0, 3, 4] and [r["step"] for r in dense] == list(range(5))
    for r in sparse:
        assert (r["loss_stage"], r["grad_norm_stage"], r["lr"]) == (
            dense[r["step"]]["loss_stage"], dense[r["step"]]["grad_norm_stage"], dense[r["step"]]["lr"])
    assert_same_weights(load_state(tmp_path / "sparse" / LAST)["model"], load_state(tmp_path / "dense" / LAST)["model"])


def test_resume_refuses_a_different_model_and_a_fresh_run_refuses_an_old_dir(tmp_path):
    train(tiny(tmp_path, "train.max_steps=2"))
    with pytest.raises(ValueError, match="differs from the checkpoint's in model.embed_dim, train.batch_size"):
        Trainer(tiny(tmp_path, "model.embed_dim=32", "train.batch_size=16"), resume=True)
    with pytest.raises(ValueError, match="--resume"):
        Trainer(tiny(tmp_path))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Trainer(tiny(tmp_path / "empty"), resume=True)


def test_checkpoints_rotate_and_load_into_a_model(tmp_path):
    summary = train(tiny(tmp_path, "train.epochs=3", "train.keep_last=2"))
    assert summary["steps"] == 18 and summary["epochs_completed"] == 3
    assert [p.name for p in epoch_checkpoints(tmp_path)] == ["epoch_0002.pt", "epoch_0003.pt"]
    last = load_state(tmp_path / LAST)
    assert last["step"] == 18 and last["epoch"] == 3
    model = isolocal.load_checkpoint(tmp_path / LAST)
    assert isinstance(model, StagewiseEncoder) and not model.training
    assert_same_weights(model.state_dict(), last["model"])
    cfg = load_run_config(tmp_path / "config.toml")  # the run directory's config reproduces the run
    assert cfg == tiny(tmp_path, "train.epochs=3", "train.keep_last=2")


# ----------------------------------------------------------------------------- crash-safe writes

def test_a_write_that_fails_midway_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    old = {"step": 1, "w": torch.arange(1000.0)}
    save_checkpoint(old, tmp_path, epoch_end=1, keep_last=2)
    real_save = torch.save

    def half_then_fail(obj, f):  # the disk fills up halfway through the new checkpoint
        real_save(obj, tmp_path / "full.bin")
        f.write((tmp_path / "full.bin").read_bytes()[: 2000])
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint({"step": 2, "w": torch.zeros(1000)}, tmp_path, epoch_end=2, keep_last=2)
    monkeypatch.undo()
    assert torch.equal(load_state(tmp_path / LAST)["w"], old["w"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_0001.pt", "full.bin", LAST]  # no temp file left


def test_a_process_killed_mid_write_leaves_the_previous_checkpoint(tmp_path):
    """SIGKILL in the middle of torch.save: no cleanup code runs, the old file must still load."""
    atomic_save({"step": 1}, tmp_path / LAST)
    script = textwrap.dedent(f"""
        import os, signal, torch
        from isolocal.io.checkpoint import atomic_save
        real_save = torch.save
        def save_then_die(obj, f):
            real_save(obj, f)
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)  # the bytes are out, the rename never happens
        torch.save = save_then_die
        atomic_save({{"step": 2, "w": torch.zeros(10_000)}}, {str(tmp_path / LAST)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], timeout=120, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -signal.SIGKILL
    assert load_state(tmp_path / LAST) == {"step": 1}


# ------------------------------------------------------------------------------ global vs isolated

def test_global_and_isolated_runs_consume_identical_images_and_masks(tmp_path):
    seen: dict[str, list] = {"global": [], "isolated": []}
    for mode, batches in seen.items():
        hook = (lambda b: lambda images, mask: b.append((images.clone(), mask.clone())))(batches)
        train(tiny(tmp_path / mode, f"model.boundary={mode!r}", "train.accum_steps=2", "train.max_steps=5"), on_batch=hook)
    assert len(seen["global"]) == len(seen["isolated"]) == 10
    for (img_g, mask_g), (img_i, mask_i) in zip(seen["global"], seen["isolated"]):
        assert torch.equal(img_g, img_i) and torch.equal(mask_g, mask_i)
    assert not torch.equal(seen["global"][0][1], seen["global"][1][1])  # masks do change per micro-batch
    g, i = records(tmp_path / "global"), records(tmp_path / "isolated")
    assert g[0]["loss_stage"] == i[0]["loss_stage"]  # same weights, data and masks: same first losses
    lower = zip(g[0]["grad_norm_stage"][:-1], i[0]["grad_norm_stage"][:-1])
    assert all(a != pytest.approx(b, rel=1e-3) for a, b in lower)  # but lower stages get other gradients
    assert g[0]["grad_norm_stage"][-1] == pytest.approx(i[0]["grad_norm_stage"][-1], rel=1e-5)  # top: own loss only


class SavedActivationPeak:
    """Peak bytes of activations autograd holds for backward, via saved_tensors_hooks.

    What gradient isolation changes is how many activations are alive at once; weights, gradients
    and optimizer state are the same in both modes. Counting the tensors autograd saves (once per
    storage, weights excluded) measures exactly that, deterministically, unaffected by the allocator
    and by other processes on the machine, unlike RSS.
    """

    def __init__(self, weights: set[int]):
        self.weights = weights  # storages of parameters: autograd saves weights (and views of them) too
        self.refs: dict[int, int] = {}
        self.live = self.peak = 0

    def pack(self, t: torch.Tensor):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in self.weights:
            return t
        if self.refs.get(key, 0) == 0:
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
        self.refs[key] = self.refs.get(key, 0) + 1
        return _Saved(t, key, self, storage.nbytes())

    @staticmethod
    def unpack(saved):
        return saved.t if isinstance(saved, _Saved) else saved

    def release(self, key: int, nbytes: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            self.live -= nbytes


class _Saved:
    def __init__(self, t, key, probe, nbytes):
        self.t, self.key, self.probe, self.nbytes = t, key, probe, nbytes

    def __del__(self):
        self.probe.release(self.key, self.nbytes)


def test_isolated_training_holds_fewer_activations_than_global(tmp_path):
    peaks = {}
    for mode in ("global", "isolated"):
        cfg = tiny(tmp_path / mode, f"model.boundary={mode!r}", "train.batch_size=32", "data.synthetic_size=32",
                   "train.max_steps=1")
        trainer = Trainer(cfg)
        probe = SavedActivationPeak({p.untyped_storage().data_ptr() for p in trainer.model.parameters()})
        try:
            with torch.autograd.graph.saved_tensors_hooks(probe.pack, probe.unpack):
                trainer.fit()
        finally:
            trainer.close()
        assert probe.live == 0  # every saved activation was released by the end of the step
        peaks[mode] = probe.peak
    ratio = peaks["isolated"] / peaks["global"]
    print(f"\npeak saved activations, 4-stage nano, batch 32: global {peaks['global'] / 2**20:.2f} MiB, "
          f"isolated {peaks['isolated'] / 2**20:.2f} MiB, ratio {ratio:.3f}")
    assert ratio < 0.6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_isolated_peak_memory_is_lower(tmp_path):
    """On a GPU: amp=auto trains in bf16 autocast, and max_memory_allocated shows the isolated saving."""
    peaks = {}
    for mode in ("global", "isolated"):
        cfg = tiny(tmp_path / mode, f"model.boundary={mode!r}", "train.batch_size=256", "data.synthetic_size=512",
                   "train.max_steps=2", "train.device=cuda")
        trainer = Trainer(cfg)
        assert trainer.amp_dtype == torch.bfloat16
        try:
            summary = trainer.fit()
        finally:
            trainer.close()
        assert math.isfinite(summary["final_loss"])
        peaks[mode] = summary["peak_mem_mb"]
    print(f"\nCUDA peak allocated: global {peaks['global']:.1f} MiB, isolated {peaks['isolated']:.1f} MiB, "
          f"ratio {peaks['isolated'] / peaks['global']:.3f}")
    assert peaks["isolated"] < 0.8 * peaks["global"]


# ------------------------------------------------------------------------------------- optimizer

def test_param_groups_lr_scaling_and_schedule():
    cfg = tiny(Path("unused"), "train.batch_size=512", "train.base_lr=1e-3", "train.min_lr=1e-5",
               "train.epochs=10", "train.warmup_epochs=2", "train.stage_lr_scale=[1.0, 0.5, 0.5, 0.25]").train
    model = isolocal.create_model("localmim_vit_nano")
    (opt,) = build_optimizers(model, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    for group in opt.param_groups:
        decayed = group["weight_decay"] > 0
        for p in group["params"]:
            assert decayed == (p.ndim > 1 and not names[id(p)].endswith(".bias")), names[id(p)]
            assert model.stage_of(names[id(p)]) == group["stage"]
    assert sum(len(g["params"]) for g in opt.param_groups) == sum(p.requires_grad for p in model.parameters())

    sched = build_scheduler(opt, cfg, steps_per_epoch=10)  # 20 warmup steps, 100 in all
    peak = 1e-3 * 512 / 256

    def lr_at(step: int, stage: int) -> float:
        sched.step_update(step)
        return next(g["lr"] for g in opt.param_groups if g["stage"] == stage)

    assert lr_at(0, 0) == 0.0
    assert lr_at(10, 0) == pytest.approx(peak / 2)
    assert lr_at(20, 0) == pytest.approx(peak)
    assert lr_at(60, 0) == pytest.approx(1e-5 + 0.5 * (peak - 1e-5) * (1 + math.cos(math.pi * 40 / 80)))
    assert lr_at(99, 0) == pytest.approx(1e-5, rel=0.1)
    assert lr_at(20, 3) == pytest.approx(peak * 0.25)


def test_per_stage_optimizers_and_bad_stage_scales():
    model = isolocal.create_model("localmim_vit_nano")
    cfg = tiny(Path("unused"), "train.per_stage_optimizers=true").train
    opts = build_optimizers(model, cfg)
    assert len(opts) == model.num_stages
    for k, opt in enumerate(opts):
        assert {id(p) for g in opt.param_groups for p in g["params"]} == {
            id(p) for p in model.stages[k].parameters() if p.requires_grad}
    with pytest.raises(ConfigError, match="stage_lr_scale has 2 values but the model has 4 stages"):
        build_optimizers(model, tiny(Path("unused"), "train.stage_lr_scale=[1.0, 2.0]").train)


def test_clip_stage_gradients_clips_each_stage_on_its_own_norm():
    from isolocal.train.step import clip_stage_gradients

    a = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))]
    b = [torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(1))]  # b[1] gets no gradient
    a[0].grad, a[1].grad, b[0].grad = torch.tensor([3.0, 0.0, 0.0]), torch.tensor([0.0, 4.0]), torch.full((4,), 0.05)
    norms = clip_stage_gradients([a, b], 0.0)  # 0: measure only
    assert norms.tolist() == pytest.approx([5.0, 0.1])
    assert a[0].grad.tolist() == [3.0, 0.0, 0.0] and b[0].grad.tolist() == pytest.approx([0.05] * 4)
    norms = clip_stage_gradients([a, b], 1.0)
    assert norms.tolist() == pytest.approx([5.0, 0.1])  # the norms before clipping
    assert a[0].grad.tolist() + a[1].grad.tolist() == pytest.approx([0.6, 0.0, 0.0, 0.0, 0.8], abs=1e-6)
    assert b[0].grad.tolist() == pytest.approx([0.05] * 4) and b[1].grad is None  # under the limit: untouched


def test_gradients_are_clipped_per_stage(tmp_path):
    trainer = Trainer(tiny(tmp_path, "train.clip_grad=0.05", "model.boundary='isolated'"))
    try:
        micro = [(torch.randn(8, 1, 32, 32), trainer.model.random_mask(8))]
        trainer.train_step(micro)
        norms = trainer.grad_norms
        after = [torch.nn.utils.get_total_norm([p.grad for p in ps]).item() for ps in trainer.stage_params]
        assert all(n > 0.05 for n in norms.tolist())  # all were above the limit before clipping
        assert after == pytest.approx([0.05] * 4, rel=1e-4)  # and each stage is clipped on its own norm
    finally:
        trainer.close()


# -------------------------------------------------------------------------- export to timm

def test_export_cli_writes_a_timm_state_dict(tmp_path):
    from isolocal.cli import main

    train(tiny(tmp_path, "train.max_steps=2"))
    assert main(["export", "--ckpt", str(tmp_path / LAST), "--out", str(tmp_path / "enc.pt")]) == 0
    meta = json.loads((tmp_path / "enc.json").read_text())
    vit = timm.create_model(meta["timm_model"], pretrained=False, **meta["kwargs"])
    vit.load_state_dict(torch.load(tmp_path / "enc.pt", weights_only=True))
    model = isolocal.load_checkpoint(tmp_path / LAST)
    images = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(vit.forward_features(images), model.encode(images)[-1], atol=1e-5)


# ------------------------------------------------------------------------------ data parallel

DDP_SCRIPT = """
import sys, torch
from isolocal.config.load import load_run_config
from isolocal.train import Trainer
out = sys.argv[1]
cfg = load_run_config(None, sys.argv[2:])
cfg.out_dir = out
seen = []
trainer = Trainer(cfg, on_batch=lambda images, mask: seen.append((images.clone(), mask.clone())))
try:
    trainer.fit()
    torch.save({"model": trainer.model.state_dict(), "seen": seen}, f"{out}/rank{trainer.dist.rank}.pt")
finally:
    trainer.close()
"""


@pytest.mark.slow
def test_two_process_data_parallel_ends_with_identical_parameters(tmp_path):
    overrides = [*TINY, "model.boundary='isolated'", "train.accum_steps=2", "train.clip_grad=1.0", "train.max_steps=3"]
    torchrun_two(DDP_SCRIPT, tmp_path, overrides)

    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert_same_weights(r0["model"], r1["model"])
    torch.manual_seed(0)
    model = StagewiseEncoder(load_run_config(None, overrides).model)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    assert any(not torch.equal(init[k], r0["model"][k]) for k in init)  # it did train
    # Step 0 in one process over the same total batch (both ranks' two micro-batches): the mean of the
    # four losses. The logged per-stage gradient norms (before clipping) must be that gradient's.
    for images, mask in r0["seen"][:2] + r1["seen"][:2]:
        (model(images, mask).loss / 4).backward()
    expected = [torch.nn.utils.get_total_norm([p.grad for p in stage.parameters() if p.grad is not None]).item()
                for stage in model.stages]
    assert records(tmp_path)[0]["grad_norm_stage"] == pytest.approx(expected, rel=1e-4)
    assert len(r0["seen"]) == len(r1["seen"]) == 6 and r0["seen"][0][0].shape[0] == 2  # 8 = 2 ranks x 2 x 2
    for (img0, mask0), (img1, mask1) in zip(r0["seen"], r1["seen"]):
        assert not torch.equal(img0, img1) and not torch.equal(mask0, mask1)  # each rank its own data and masks
    steps = records(tmp_path)
    assert [r["step"] for r in steps] == [0, 1, 2]  # rank 0 alone writes the log
    assert_same_weights(load_state(tmp_path / LAST)["model"], r0["model"])


AVERAGE_SCRIPT = """
import sys, torch
import isolocal
from isolocal.train import distributed
from isolocal.train.step import backward_step
info = distributed.setup("cpu")
g = torch.Generator().manual_seed(0)
images = torch.randn(8, 1, 32, 32, generator=g)
out = {"gathered": distributed.gather_objects(info.rank * 10, info.world),
       "max": distributed.max_over_ranks(3.0 * info.rank + 1.0, info.world, torch.device("cpu"))}
for boundary in ("isolated", "global"):
    torch.manual_seed(info.rank)  # different weights per rank until the broadcast
    model = isolocal.create_model("localmim_vit_nano", boundary=boundary)
    mask = model.random_mask(8, generator=torch.Generator().manual_seed(1))
    distributed.broadcast_parameters(model)
    mine = slice(4 * info.rank, 4 * info.rank + 4)  # this rank's half, as two micro-batches of 2
    losses = sum(backward_step(model, images[mine][i:i + 2], mask[mine][i:i + 2], accum=2) for i in (0, 2))
    distributed.average_gradients([[p for p in s.parameters() if p.requires_grad] for s in model.stages], info.world)
    local = losses.clone()
    out[boundary] = {"losses": distributed.mean_over_ranks(losses, info.world), "kept": torch.equal(local, losses),
                     "grads": {n: p.grad for n, p in model.named_parameters() if p.requires_grad}}
torch.save(out, f"{sys.argv[1]}/rank{info.rank}.pt")
distributed.teardown(info)
"""


@pytest.mark.slow
def test_averaged_gradients_of_two_processes_equal_one_process_over_the_whole_batch(tmp_path):
    """2 gloo processes, each with half of a batch of 8 (two micro-batches of 2), gradients averaged
    by `average_gradients`: equal, parameter by parameter, to one process's gradient over all 8
    (every image masks the same number of tokens, so the loss is a plain mean over the halves)."""
    script = tmp_path / "average.py"
    script.write_text(AVERAGE_SCRIPT)
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path)], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True) for r in (0, 1)]
    try:
        outputs = [p.communicate(timeout=180)[0].decode() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["gathered"] == ranks[1]["gathered"] == [0, 10]
    assert ranks[0]["max"] == ranks[1]["max"] == 4.0
    one = torch.tensor([1.0, 2.0])  # one process: the values themselves, no process group needed
    assert distributed.mean_over_ranks(one, 1) is one and distributed.max_over_ranks(3.0, 1, torch.device("cpu")) == 3.0
    assert distributed.gather_objects(7, 1) == [7]
    g = torch.Generator().manual_seed(0)
    images = torch.randn(8, 1, 32, 32, generator=g)
    for boundary in ("isolated", "global"):
        torch.manual_seed(0)  # rank 0's weights, which the broadcast gave both ranks
        model = isolocal.create_model("localmim_vit_nano", boundary=boundary)
        mask = model.random_mask(8, generator=torch.Generator().manual_seed(1))
        out = model(images, mask)
        out.loss.backward()
        for rank in ranks:
            torch.testing.assert_close(rank[boundary]["losses"], torch.stack(out.losses).detach())
            assert rank[boundary]["kept"]  # the rank's own values are not overwritten by the mean
            grads = rank[boundary]["grads"]
            assert grads.keys() == {n for n, p in model.named_parameters() if p.requires_grad}
            for n, p in model.named_parameters():
                if p.requires_grad:
                    torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-7, msg=f"{boundary} {n}")


def test_probes_log_attention_and_knn_without_changing_training(tmp_path):
    probed = tiny(tmp_path / "probed", "train.analysis_every=2", "train.knn_every_epochs=1", "eval.knn_k=3",
                  "eval.train_subset=48", "eval.val_fraction=0.5", "eval.test_subset=16")
    train(probed)
    train(tiny(tmp_path / "plain"))
    analysis = records(tmp_path / "probed", "analysis")
    steps = len(records(tmp_path / "plain"))  # log_every = 1: one record per step
    assert [r["step"] for r in analysis] == list(range(0, steps, 2))
    assert analysis and all(len(r["nmi_layer"]) == probed.model.depth == len(r["attn_dist_layer"]) for r in analysis)
    knn = records(tmp_path / "probed", "knn")
    assert [r["epoch"] for r in knn] == list(range(1, probed.train.epochs + 1))
    # on the 24 validation images, never test; 10 grating classes: chance 10 %
    assert all(r[f"knn_val_top1_stage{k}"] > 40.0 for r in knn for k in range(4)), knn
    assert [r["loss_stage"] for r in records(tmp_path / "probed")] == [r["loss_stage"] for r in records(tmp_path / "plain")]


def test_no_weight_decay_on_norms_biases_and_swin_position_bias_tables():
    from isolocal.config import TrainConfig
    from isolocal.train.optim import stage_param_groups

    model = isolocal.create_model("localmim_swin_nano")
    names = {id(p): n for n, p in model.named_parameters()}
    for groups in stage_param_groups(model.stages, TrainConfig()):
        for group in groups:
            for p in group["params"]:
                exempt = p.ndim <= 1 or names[id(p)].endswith(("bias", "relative_position_bias_table"))
                assert (group["weight_decay"] == 0.0) == exempt, names[id(p)]


@pytest.mark.slow
def test_compiled_stages_train_like_eager_and_save_plain_checkpoints(tmp_path):
    """train.compile=true: torch.compile'd stages give the eager run's losses; checkpoints load uncompiled."""
    train(tiny(tmp_path / "eager", "train.epochs=1", "data.synthetic_size=24"))
    train(tiny(tmp_path / "compiled", "train.epochs=1", "data.synthetic_size=24", "train.compile=true"))
    eager, compiled = records(tmp_path / "eager"), records(tmp_path / "compiled")
    assert len(eager) == len(compiled) == 3
    for a, b in zip(eager, compiled):
        assert a["loss_stage"] == pytest.approx(b["loss_stage"], rel=1e-4)
    model = isolocal.load_checkpoint(tmp_path / "compiled" / LAST)
    assert not any("_orig_mod" in k for k in model.state_dict())
