"""The ResNet family (`arch = "resnet"`): timm's residual blocks split into stages at block taps, with
auxiliary classify / contrastive heads on feature maps. Export loads strictly into timm with its
features; isolation under autograd; every preset's split covers each block once; validation before
any work; the CLI trains on (padded) Fashion-MNIST; gradient checkpointing changes no number; a
2-rank DeepSpeed pipeline of feature maps gives the single-process parameters."""
from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch
import torch.nn.functional as F

from isolocal.cli import main
from isolocal.config import ConfigError, ModelConfig
from isolocal.data import SyntheticImages, build_dataset
from isolocal.io.export import export_timm, timm_kwargs
from isolocal.eval.features import extract_features
from isolocal.heads import HEADS, ClassifyHead, pool
from isolocal.models.encoder import StagewiseEncoder
from isolocal.models.resnet import BLOCKS, isolocal_resnet, resnet_timm_name_and_kwargs
from isolocal.config.presets import list_models, preset_config
from isolocal.config.load import load_run_config
from isolocal.study.schema import load_study, resolve_run
from isolocal.train.loop import build_model
from test_pipeline import assert_pipeline_equals_single_process

REPO = Path(__file__).resolve().parents[1]


def tiny(**kw) -> ModelConfig:
    """A CIFAR-style ResNet of 4 BasicBlocks in 3 timm stages (4/8/8 channels) on 16 px gray images."""
    base = dict(arch="resnet", img_size=16, in_chans=1, block="basic", depths=[1, 1, 2], channels=[4, 8, 8],
                stem="cifar", taps=[1, 3], objective="classify", head_hidden=8)
    return ModelConfig(**{**base, **kw})


def batch(model: StagewiseEncoder, samples: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    c, s = model.cfg.in_chans, model.cfg.img_size
    images = torch.randn(samples * model.views, c, s, s, generator=g)
    return images, model.random_mask(len(images), g), torch.randint(0, 10, (samples,), generator=g)


def trained_stats(model: StagewiseEncoder) -> StagewiseEncoder:
    """Two training forwards, so the BatchNorm running statistics are not their init."""
    for seed in (1, 2):
        images, mask, labels = batch(model, seed=seed)
        model(images, mask, labels=labels)
    return model.eval()


# ---------------------------------------------------------------------------------------- export

@pytest.mark.parametrize("kw", [
    {},  # CIFAR stem, 3 stages, gray: timm's ResNet needs `isolocal_resnet`
    dict(block="bottleneck", depths=[1, 2], channels=[4, 8], stem="imagenet", img_size=64, in_chans=3, taps=[0, 2]),
], ids=["cifar_basic", "imagenet_bottleneck"])
def test_export_loads_strictly_into_timm_and_gives_its_forward_features(kw):
    torch.manual_seed(0)
    model = trained_stats(StagewiseEncoder(tiny(**kw)))
    name, sd = export_timm(model)
    assert name == "isolocal_resnet"
    net = timm.create_model(name, num_classes=0, **timm_kwargs(model)).eval()
    net.load_state_dict(sd, strict=True)
    assert any(k.endswith("running_var") for k in sd) and not any("head" in k for k in sd)
    images = batch(model, seed=3)[0]
    with torch.no_grad():
        assert torch.equal(model.encode(images)[-1], net.forward_features(images))


def test_a_standard_resnet18_exports_under_timms_own_name():
    torch.manual_seed(0)
    model = StagewiseEncoder(dataclasses.replace(preset_config("resnet18"), img_size=64)).eval()
    name, sd = export_timm(model)
    assert (name, timm_kwargs(model)) == ("resnet18", {})
    net = timm.create_model(name, num_classes=0).eval()
    net.load_state_dict(sd, strict=True)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.encode(images)[-1], net.forward_features(images))


def timm_resnet_args(name: str) -> tuple[type, tuple[int, ...]]:
    """(block class, layers) that timm's own `name` entrypoint builds, read without building it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(timm.models.resnet, "_create_resnet", lambda variant, pretrained, **kw: (kw["block"], kw["layers"]))
        return getattr(timm.models.resnet, name)()


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"])
def test_every_standard_imagenet_geometry_exports_under_timms_name_and_no_other(name):
    """timm's own name exactly for its block and layers with the ImageNet stem and widths; the CIFAR stem
    at the same geometry is `isolocal_resnet`."""
    block, layers = timm_resnet_args(name)
    kind = next(k for k, cls in BLOCKS.items() if cls is block)
    cfg = tiny(block=kind, depths=list(layers), channels=[64, 128, 256, 512], stem="imagenet", img_size=224,
               in_chans=3, taps=[sum(layers) - 1])
    assert resnet_timm_name_and_kwargs(SimpleNamespace(cfg=cfg)) == (name, {})
    cifar = dataclasses.replace(cfg, stem="cifar")
    assert resnet_timm_name_and_kwargs(SimpleNamespace(cfg=cifar))[0] == "isolocal_resnet"


def test_isolocal_resnet_defaults_to_timms_resnet18():
    """The registered entrypoint without arguments is timm's ResNet-18, parameter for parameter."""
    ours, theirs = isolocal_resnet().state_dict(), timm.create_model("resnet18").state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


# ---------------------------------------------------------------------------------------- geometry and init

@pytest.mark.parametrize("kw", [
    {},  # CIFAR stem, basic blocks, 3 timm stages
    dict(block="bottleneck", depths=[1, 2], channels=[4, 8], stem="imagenet", img_size=64, in_chans=3, taps=[0, 2]),
], ids=["cifar_basic", "imagenet_bottleneck"])
def test_each_stage_outputs_the_map_its_tap_describes(kw):
    """Stage k's map is (B, tap.dim, tap.grid, tap.grid), a tap's cell tiles the image, its head reads the
    map at its own resolution (scale 1, as `isolocal info` prints); the stems are timm's (ImageNet) and
    He et al.'s 3x3 / 1 conv without bias or pool (CIFAR)."""
    torch.manual_seed(0)
    model = StagewiseEncoder(tiny(**kw)).eval()
    images = batch(model, samples=2)[0]
    with torch.no_grad():
        maps = model.encode(images)
    for x, tap in zip(maps, model.taps):
        assert x.shape == (len(images), tap.dim, tap.grid, tap.grid)
        assert tap.grid * tap.cell == model.cfg.img_size and tap.scale == 1.0
    conv, pool = model.stages[0].conv1, model.stages[0].maxpool
    if model.cfg.stem == "cifar":
        assert (conv.kernel_size, conv.stride, conv.padding, conv.bias) == ((3, 3), (1, 1), (1, 1), None)
        assert isinstance(pool, torch.nn.Identity)
    else:
        ref = timm.create_model("resnet18")
        assert [(c.kernel_size, c.stride, c.padding, c.bias) for c in (conv, ref.conv1)] == [
            (ref.conv1.kernel_size, ref.conv1.stride, ref.conv1.padding, None)] * 2
        assert (pool.kernel_size, pool.stride, pool.padding) == (ref.maxpool.kernel_size, ref.maxpool.stride,
                                                                 ref.maxpool.padding)


def test_weights_start_from_timms_resnet_init():
    """He normal (fan out) convolutions and a zero last BatchNorm in every residual branch, so each block
    starts as its shortcut."""
    torch.manual_seed(0)
    model = StagewiseEncoder(preset_config("resnet32_k4"))
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.numel() >= 4096]
    assert convs
    for conv in convs:
        fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
        assert float(conv.weight.detach().std()) == pytest.approx(math.sqrt(2.0 / fan_out), rel=0.05)
    blocks = [block for stage in model.stages for block in stage.blocks]
    assert len(blocks) == 15 and all(not block.bn2.weight.any() for block in blocks)


# ---------------------------------------------------------------------------------------- isolation

def stage_grads(model: StagewiseEncoder, loss: torch.Tensor) -> list[list[torch.Tensor]]:
    params = [list(s.parameters()) for s in model.stages]
    flat = [p for group in params for p in group]
    grads = torch.autograd.grad(loss, flat, retain_graph=True, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(flat, grads)]
    out, i = [], 0
    for group in params:
        out.append(grads[i:i + len(group)])
        i += len(group)
    return out


@pytest.mark.parametrize("taps", [[1, 3], [0, 1, 2, 3]], ids=["k2", "k4"])
@pytest.mark.parametrize("objective", ["classify", "contrastive"])
def test_isolated_stages_get_only_their_own_losses_gradient(taps, objective):
    """Isolated: d loss_k / d stage j < k is zero, and each stage's share of the summed loss's gradient is
    its own loss's. Global: a later loss reaches the earlier stages."""
    torch.manual_seed(0)
    model = StagewiseEncoder(tiny(taps=taps, objective=objective, boundary="isolated"))
    images, mask, labels = batch(model)
    out = model(images, mask, labels=labels)
    assert all(math.isfinite(float(loss.detach())) for loss in out.losses)
    total = stage_grads(model, out.loss)
    for k, loss in enumerate(out.losses):
        grads = stage_grads(model, loss)
        assert all(not g.any() for j in range(k) for g in grads[j])
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads[k], total[k]))
        assert any(g.any() for g in grads[k])
    model.set_boundary("global")
    out = model(images, mask, labels=labels)
    assert any(g.any() for g in stage_grads(model, out.losses[-1])[0])


# ---------------------------------------------------------------------------------------- presets

RESNET_PRESETS = [n for n in list_models() if preset_config(n).arch == "resnet"]


def test_the_presets_are_the_cifar_resnets_at_every_k_and_timms_resnet18_50():
    assert RESNET_PRESETS == sorted([f"resnet{d}_k{k}" for d in (32, 110) for k in (2, 4, 8, 16) if (d, k) != (32, 16)]
                                    + ["resnet18", "resnet50"])  # ResNet-32's 15 blocks make at most 15 stages


@pytest.mark.parametrize("name", RESNET_PRESETS)
def test_every_presets_stages_cover_each_block_once_split_evenly(name):
    cfg = preset_config(name)
    torch.manual_seed(0)
    model = StagewiseEncoder(cfg)
    owned = [stage.timm_names for stage in model.stages]
    timm_blocks = [f"layer{s + 1}.{i}" for s, depth in enumerate(cfg.depths) for i in range(depth)]
    assert [n for names in owned for n in names] == timm_blocks
    sizes = [len(names) for names in owned]
    if name.startswith("resnet32") or name.startswith("resnet110"):
        assert len(sizes) == int(name.rsplit("_k", 1)[1]) and max(sizes) - min(sizes) <= 1
        assert (cfg.img_size, cfg.in_chans, cfg.channels, cfg.stem) == (32, 1, [16, 32, 64], "cifar")
        assert sum(sizes) == (15 if name.startswith("resnet32") else 54)
    else:
        assert sizes == cfg.depths  # one stage per timm stage
    assert model.objectives == ["classify"] * len(sizes) and model.stages[0].has_stem
    assert not any(s.has_stem for s in model.stages[1:])


# ---------------------------------------------------------------------------------------- validation

@pytest.mark.parametrize("kw, message", [
    (dict(objective="mim"), r"model.objective 'mim' \(stages \[0, 1\]\) needs a token grid.*use one of "
                            r"'auglocal', 'classify', 'contrastive', 'dgl', 'infopro', 'man'$"),
    (dict(objective=["classify", "mim"]), r"'mim' \(stages \[1\]\)"),
    (dict(taps=[1, 2]), r"the last tap must be the last block \(3\), got 2"),
    (dict(taps=[1, 4]), r"taps must be residual block indices in \[0, 3\], got \[1, 4\]"),
    (dict(channels=[4, 8]), r"channels must give one width >= 1 per ResNet stage \(3, from depths\), got \[4, 8\]"),
    (dict(depths=[1, 1, 1, 1, 1], channels=[4] * 5, taps=[4]), r"1 to 4 ResNet stages"),
    (dict(channels=[5, 8, 8]), r"cifar stem needs an even channels\[0\].*got 5"),
    (dict(block="wide"), r"model.block must be basic or bottleneck, got 'wide'"),
    (dict(img_size=18), r"img_size 18 must be divisible by the ResNet's stride 4"),
    (dict(depths=[2, 1], channels=[4, 8], taps=[1, 2], img_size=15),
     r"img_size 15 must be divisible by the ResNet's stride 2"),  # the last block's stride, not the one before
    (dict(img_size=0), r"img_size must be >= 1, got 0"),
    (dict(in_chans=0), r"in_chans must be >= 1, got 0"),
    (dict(stem="tiny"), r"model.stem must be imagenet or cifar, got 'tiny'"),
    (dict(depths=[1], channels=[4], taps=[0]), r"a ResNet needs >= 2 residual blocks"),
    (dict(taps=[]), r"taps must list at least one block"),
    (dict(taps=[2, 1, 3]), r"taps must be increasing, got \[2, 1, 3\]"),
    (dict(taps=[1, 1, 3]), r"taps must be increasing, got \[1, 1, 3\]"),
])
def test_bad_resnet_configs_are_refused_before_any_weights(kw, message):
    with pytest.raises(ValueError, match=message):
        StagewiseEncoder.check_config(tiny(**kw))
    with pytest.raises(ValueError, match=message):
        StagewiseEncoder(tiny(**kw))


def test_every_reconstructing_head_is_named_when_a_resnet_is_given_one(monkeypatch):
    monkeypatch.setitem(HEADS, "mim2", HEADS["mim"])  # a second head that needs the target
    with pytest.raises(ValueError, match=r"model.objective 'mim' / 'mim2' \(stages \[0, 1\]\)"):
        StagewiseEncoder.check_config(tiny(objective=["mim", "mim2"]))


@pytest.mark.parametrize("kw", [
    dict(depths=[2], channels=[2], taps=[1], img_size=1),  # one timm stage (stride 1), a 1-pixel image
    dict(depths=[1, 1], channels=[2, 1], taps=[0, 1], img_size=2),  # two blocks, a stage one channel wide
], ids=["one_stage_one_pixel", "two_blocks_width_one"])
def test_the_smallest_resnets_the_checks_accept_build_and_run(kw):
    torch.manual_seed(0)
    model = StagewiseEncoder(tiny(**kw))
    maps = model.encode(torch.randn(4, 1, model.cfg.img_size, model.cfg.img_size))  # too small a map to mask
    assert [x.shape[1:] for x in maps] == [(t.dim, t.grid, t.grid) for t in model.taps]
    assert all(torch.isfinite(x).all() for x in maps)


def test_a_resnet_has_no_cls_token_to_pool():
    with pytest.raises(ValueError, match="eval.feature = 'cls' needs a model with a CLS token"):
        extract_features(StagewiseEncoder(tiny()), SyntheticImages(4, 16, 1), feature="cls", progress=False)


def test_bad_resnet_fields_are_config_errors_naming_the_key():
    for key, value, message in (("block", "'wide'", "model.block must be basic or bottleneck, got 'wide'"),
                                ("stem", "'tiny'", "model.stem must be imagenet or cifar, got 'tiny'"),
                                ("channels", "[16, 0, 64]", r"model.channels entries must be >= 1")):
        with pytest.raises(ConfigError, match=message):
            load_run_config(None, ["preset=resnet32_k4", f"model.{key}={value}"])
    with pytest.raises(ConfigError, match="train.analysis_every = 5 measures attention, which a resnet has none of"):
        load_run_config(None, ["preset=resnet32_k4", "train.analysis_every=5"])
    with pytest.raises(ConfigError, match="train.grad_checkpoint = true is not supported with train.compile = true"):
        load_run_config(None, ["preset=resnet32_k4", "train.grad_checkpoint=true", "train.compile=true"])
    with pytest.raises(ConfigError, match="data.pad must be >= 0, got -1"):
        load_run_config(None, ["preset=resnet32_k4", "data.pad=-1"])


# ---------------------------------------------------------------------------------------- heads on maps

def test_classify_reads_maps_through_a_conv_and_tokens_as_before():
    """On a map: conv-BN-ReLU at the stage's width, then the pooled MLP; the ViT head has no conv."""
    torch.manual_seed(0)
    model = StagewiseEncoder(tiny())
    head = model.stages[0].head
    assert isinstance(head, ClassifyHead) and head.conv.conv.weight.shape == (8, 8, 3, 3)
    maps = torch.randn(4, 8, 4, 4)
    expected = head.mlp(pool(F.relu(head.conv.bn(head.conv.conv(maps))), 0))
    assert torch.allclose(head.logits(maps, 0), expected)
    vit_head = ClassifyHead(16, 10)
    assert [n for n, _ in vit_head.named_parameters()] == ["mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias"]


# ---------------------------------------------------------------------------------------- training

def test_padding_puts_fashion_mnist_in_the_middle_of_32_px():
    plain, _, _ = build_dataset("fashion_mnist", None, True, 28, 1, transform_train=False)
    padded, _, _ = build_dataset("fashion_mnist", None, True, 32, 1, transform_train=False, pad=2)
    a, b = plain[0][0], padded[0][0]
    assert b.shape == (1, 32, 32) and torch.equal(b[:, 2:30, 2:30], a)
    assert torch.all(b[:, :2] == b[0, 0, 0]) and float(b[0, 0, 0]) < 0  # black, normalized


def test_the_cli_trains_resnet32_k4_on_padded_fashion_mnist(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", "--set", "preset=resnet32_k4", "model.boundary='isolated'", "data.pad=2",
                 "data.train_subset=64", "train.batch_size=16", "train.max_steps=2", "train.log_every=1",
                 f"out_dir={str(out)!r}"]) == 0
    assert "isolated run: 2 steps" in capsys.readouterr().out
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss_stage"] for r in steps if r["kind"] == "step"]
    assert len(losses) == 2 and all(len(row) == 4 and all(math.isfinite(v) and v > 0 for v in row) for row in losses)
    assert all(v == pytest.approx(math.log(10), rel=0.5) for v in losses[0])  # 10 classes, near chance
    assert main(["export", "--ckpt", str(out), "--out", str(tmp_path / "enc.pt")]) == 0
    assert "load with import isolocal.models.resnet; timm.create_model('isolocal_resnet'" in capsys.readouterr().out
    sidecar = json.loads((tmp_path / "enc.json").read_text())
    net = timm.create_model(sidecar["timm_model"], **sidecar["kwargs"])
    net.load_state_dict(torch.load(tmp_path / "enc.pt"), strict=True)
    assert net.num_features == 64 and net.conv1.weight.shape == (16, 1, 3, 3)
    capsys.readouterr()
    assert main(["analyze", "nmi", "--ckpt", str(out), "--images", "fmnist:0", "--out", str(tmp_path / "nmi")]) == 2
    err = capsys.readouterr().err
    assert "is a resnet encoder: it has no attention" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "nmi").exists()


@pytest.mark.parametrize("preset, overrides", [
    ("resnet32_k4", ["model.depths=[1, 1, 2]", "model.taps=[1, 3]", "model.img_size=16", "model.boundary='global'"]),
    ("resnet32_k4", ["model.depths=[1, 1, 2]", "model.taps=[0, 1, 2, 3]", "model.img_size=16",
                     "model.objective='contrastive'", "model.boundary='isolated'"]),
    ("localmim_vit_nano", []),
    ("localmim_swin_nano", []),
], ids=["resnet_global", "resnet_contrastive_isolated", "vit_mim", "swin_mim"])
def test_gradient_checkpointing_changes_no_loss_gradient_or_batch_statistic(preset, overrides):
    """`train.grad_checkpoint` recomputes every block's forward in backward: three SGD steps give the same
    losses, weights and BatchNorm running statistics, bit for bit, as the plain run."""
    runs = []
    for flag in ("false", "true"):
        cfg = load_run_config(None, [f"preset={preset}", *overrides, f"train.grad_checkpoint={flag}"])
        model = build_model(cfg).train()
        assert model.grad_checkpoint == (flag == "true")
        calls = []
        stage = model.stages[-1]
        block = (stage.blocks if hasattr(stage, "blocks") else stage.layers)[-1]
        block.register_forward_pre_hook(lambda module, args: calls.append(1))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        losses = []
        for step in range(3):
            images, mask, labels = batch(model, samples=4, seed=step)
            out = model(images, mask, labels=labels)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            losses.append([float(v.detach()) for v in out.losses])
        assert len(calls) == 3 * (2 if flag == "true" else 1)  # checkpointed: recomputed in backward
        runs.append((losses, copy.deepcopy(model.state_dict())))
    (a, sa), (b, sb) = runs
    assert a == b
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_new_model_recomputes_nothing_until_checkpointing_is_set():
    """Without `grad_checkpoint` set, a training step runs each block once; setting it reaches every stage."""
    torch.manual_seed(0)
    model = StagewiseEncoder(tiny()).train()
    calls = []
    model.stages[-1].blocks[-1].register_forward_pre_hook(lambda module, args: calls.append(1))
    images, mask, labels = batch(model)
    model(images, mask, labels=labels).loss.backward()
    assert not model.grad_checkpoint and len(calls) == 1
    model.grad_checkpoint = True
    assert model.grad_checkpoint and all(stage.grad_checkpointing for stage in model.stages)


# ---------------------------------------------------------------------------------------- pipeline

@pytest.mark.slow
def test_a_two_rank_resnet_pipeline_gives_the_single_process_parameters(tmp_path):
    """2 DeepSpeed pipeline ranks (stages 0-1 | 2-3) send 4-D feature maps; isolated and global, after 3
    steps the parameters (BatchNorm statistics included) and logged losses equal the single-process
    trainer's (same data, labels, micro-batches) to 1e-5."""
    states = assert_pipeline_equals_single_process(tmp_path, [
        "preset=resnet32_k4", "model.depths=[1, 1, 2]", "model.taps=[0, 1, 2, 3]", "data.name=synthetic",
        "data.synthetic_size=64", "train.batch_size=16", "train.epochs=1", "train.log_every=1",
        "train.warmup_epochs=0.5", "train.max_steps=3", "train.base_lr=0.01", "pipeline.micro_batches=2",
        "pipeline.timeout_s=60"])
    assert all(any("running_mean" in k for k in state) for state in states.values())  # BatchNorm statistics too


# ---------------------------------------------------------------------------------------- study

TINY_STUDY = """
[study]
name = "tiny_resnet"
out_dir = "{out}"
seeds = [0, 1]
evals = ["knn", "linear", "head"]
baseline = "e2e"
nmi_layers = []

[study.claims.isolation]
a = "e2e"
b = "classify_k2"
metric = "peak_mem_mb"
margin = 0.0
direction = "superior"

[base]
preset = "resnet32_k2"
model = {{ depths = [1, 1, 2], taps = [1, 3] }}
[base.data]
name = "fashion_mnist"
pad = 2
train_subset = 64
[base.train]
batch_size = 32
log_every = 1
[base.eval]
feature = "mean"
knn_k = 5
linear_epochs = 1
train_subset = 64
test_subset = 32

[variants.e2e]
model = {{ taps = [3], boundary = "global" }}
[variants.classify_k2]
model = {{ boundary = "isolated" }}
"""


def test_the_shipped_resnet_study_is_paired_runs_of_resnet32_splits_and_its_floors():
    study = load_study(REPO / "experiments" / "local_learning_resnet.toml")
    assert len(study.runs()) == 30 and set(study.evals) == {"knn", "linear", "head"}
    assert {v for v, pretrained in study.pretrain.items() if not pretrained} == {"random", "pixels"}
    configs = {v: resolve_run(study, v) for v in study.variants if study.pretrain[v]}
    for variant, cfg in configs.items():
        StagewiseEncoder.check_config(cfg.model)
        StagewiseEncoder.check_masking(cfg.model)
        end_to_end = variant.startswith("e2e")
        stages = 1 if end_to_end else int(variant.rsplit("_k", 1)[1])
        assert len(cfg.model.taps) == stages and cfg.model.taps[-1] == 14 and cfg.model.depths == [5, 5, 5]
        assert cfg.model.objective == ("contrastive" if variant.startswith("contrastive") else "classify")
        assert cfg.model.boundary == ("global" if end_to_end else "isolated")
        assert cfg.train.grad_checkpoint == (variant == "e2e_ckpt")
        cfg.train.grad_checkpoint = False  # the one difference the checkpointed twin has
        assert (cfg.data, cfg.train, cfg.eval) == (configs["e2e"].data, configs["e2e"].train, configs["e2e"].eval)
    assert configs["e2e"].data.pad == 2 and configs["e2e"].eval.feature == "mean"
    assert {(c.a, c.b, c.metric) for c in study.claims.values()} == {
        *((f"classify_k{k}", "e2e", "head_top") for k in (2, 4, 8)),
        ("e2e", "classify_k8", "peak_mem_mb"), ("e2e", "e2e_ckpt", "peak_mem_mb")}


@pytest.mark.slow
def test_a_resnet_study_skips_attention_analysis_and_reports_the_heads(tmp_path):
    path = tmp_path / "study.toml"
    path.write_text(TINY_STUDY.format(out=tmp_path / "out"))
    assert main(["compare", "-c", str(path)]) == 0
    runs = sorted((tmp_path / "out" / "runs").glob("*/seed*"))
    assert len(runs) == 4
    for run in runs:
        assert json.loads((run / "result.json").read_text())["status"] == "ok"
        assert (run / "analysis.csv").read_text() == "layer,nmi,attention_distance\n"
        assert not list(run.glob("*.png"))
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Classify heads' own top-1 %" in report and "NMI" not in report and "attention distance" not in report
    assert "isolation" in report
