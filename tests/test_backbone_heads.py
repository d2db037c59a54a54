"""The heads that read the model beyond their stage, through `StageHead.bind` and a `ModelView`: `auglocal`
(fresh copies of a uniform sample of the later layers, pyramidal depth) and `man` (an EMA of the next stage
plus a trainable bias network, feeding a supervised head). Their rules and losses by hand, shapes on ResNet
and ViT, isolation (the EMA takes no gradient and moves only by its update, checked against a hand EMA),
determinism, an exact resume with the EMA in the checkpoint, the refusals (Swin; `man` in a pipeline), the
heads' own accuracy, and a 2-rank pipeline of `auglocal` equal to one process."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import isolocal
from isolocal.config import ConfigError
from isolocal.config.load import load_run_config
from isolocal.data import SyntheticImages
from isolocal.eval.head_accuracy import classify_stages, head_accuracy
from isolocal.heads import AugLocalHead, DGLHead, HeadInputs, InfoProHead, MANHead
from isolocal.heads.auglocal import pyramid_depth, uniform_sample
from isolocal.io.checkpoint import LAST, load_state
from isolocal.io.load import load_model, seeded_init
from isolocal.testing.by_hand import bn_by_hand, bn_relu_by_hand, ce_by_hand
from isolocal.train import train
from isolocal.train.launch import check_pipeline
from isolocal.train.loop import build_train_dataset
from isolocal.train.optim import build_optimizers

sys.path.insert(0, str(Path(__file__).parent))
from test_heads import TINY, inputs, tiny  # noqa: E402
from test_local_methods import step_losses  # noqa: E402

RESNET, VIT, SWIN = "resnet32_k4", "localmim_vit_nano", "localmim_swin_nano"


def model_of(preset: str, head: str, boundary: str = "isolated", **options) -> isolocal.StagewiseEncoder:
    return isolocal.create_model(preset, objective=head, boundary=boundary, head_options={head: options})


def small_resnet(head: str, **options) -> isolocal.StagewiseEncoder:
    """Two stages at 16 px: block 0 (16 channels, stride 1), then blocks 1 (32, stride 2) and 2 (64, stride 4)."""
    cfg = dataclasses.replace(isolocal.preset_config(RESNET), depths=[1, 1, 1], taps=[0, 2], img_size=16,
                              objective=head, boundary="isolated", head_options={head: options})
    return isolocal.StagewiseEncoder(cfg)


def scramble_batch_norms(module: nn.Module) -> None:
    """Random BatchNorm scales and shifts: timm zeroes each residual branch's last scale at init, which
    would hide the branch from a comparison."""
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight)
            nn.init.normal_(m.bias)


def basic_block_by_hand(x: torch.Tensor, block: nn.Module, stride: int) -> torch.Tensor:
    """timm's BasicBlock in training mode: relu(bn2(conv2(relu(bn1(conv1(x))))) + bn(conv_1x1(x)))."""
    y = bn_relu_by_hand(F.conv2d(x, block.conv1.weight, stride=stride, padding=1), block.bn1)
    y = bn_by_hand(F.conv2d(y, block.conv2.weight, padding=1), block.bn2)
    conv, bn = block.downsample
    return (y + bn_by_hand(F.conv2d(x, conv.weight, stride=stride), bn)).clamp(min=0)


# ---------------------------------------------------------------------------------------- auglocal's rules

def test_the_pyramidal_depth_falls_linearly_from_depth_and_rounds_halves_up():
    """d_k = max(1, round(d - tau (d - 1) k / (K - 2))), 0 for the last stage: d = 3, tau = 0.5, K = 6 gives
    3, 2.75, 2.5, 2.25, 2 -> 3, 3, 3, 2, 2; tau = 1 ends at 1."""
    assert [pyramid_depth(3, 0.5, k, 6) for k in range(6)] == [3, 3, 3, 2, 2, 0]
    assert [pyramid_depth(4, 1.0, k, 5) for k in range(5)] == [4, 3, 2, 1, 0]  # 4, 3, 2, 1 exactly
    assert [pyramid_depth(3, 0.0, k, 4) for k in range(4)] == [3, 3, 3, 0]  # no decay
    assert [pyramid_depth(5, 0.5, k, 2) for k in range(2)] == [5, 0]
    with pytest.raises(ValueError, match=r"stage must be in \[0, 3\], got 4"):
        pyramid_depth(2, 0.5, 4, 4)


def test_the_sample_is_evenly_spaced_ends_with_the_last_layer_and_takes_all_when_short():
    """After layer 3 of 15 (n = 11): round(3 + 11 / 2) = 9 (5.5 up) and 14."""
    assert uniform_sample(range(4, 15), 2) == [9, 14]
    assert uniform_sample(range(4, 15), 3) == [7, 10, 14]  # 3 + 3.67, 3 + 7.33, 3 + 11
    assert uniform_sample(range(8, 15), 2) == [11, 14]  # 7 + 3.5 (up), 7 + 7
    assert uniform_sample(range(2, 4), 5) == [2, 3] and uniform_sample(range(4, 4), 0) == []


def test_each_stage_copies_its_sample_of_the_later_layers_and_reaches_the_last_maps_shape():
    """resnet32_k4 (stages end at blocks 3, 7, 11, 14; 16 / 32 / 64 channels at strides 1 / 2 / 4): depth 2,
    decay 0.5 copy [9, 14], [11, 14], [13, 14] and nothing on the last stage. The copies follow the backbone's
    downsampling, so each ends at the last map's shape (half its channels at width 0.5)."""
    for width, channels in ((1.0, 64), (0.5, 32)):
        model = model_of(RESNET, "auglocal", width=width)
        images, _, _ = inputs(model, 4)
        assert [s.head.copied for s in model.stages] == [[9, 14], [11, 14], [13, 14], []]
        feats = model.encode(images)
        for k in range(3):
            assert tuple(model.stages[k].head.layers(feats[k]).shape) == (4, channels, 8, 8)
        assert isinstance(model.stages[3].head.layers, nn.Identity)
        assert [s.head.classifier.in_features for s in model.stages] == [channels] * 3 + [64]


def test_copies_are_fresh_layers_of_their_own_with_the_copied_layers_shapes():
    """No parameter is shared; stage 2's copy of block 14 (the last of stage 3) has block 14's parameter
    names and shapes, and values of its own."""
    model = model_of(RESNET, "auglocal")
    backbone = {id(p) for s in model.stages for name, p in s.named_parameters() if not name.startswith("head.")}
    copies = [id(p) for s in model.stages for p in s.head.parameters()]
    assert not backbone & set(copies) and len(copies) == len(set(copies))
    block = dict(model.stages[3].blocks[2].named_parameters())
    copy = dict(model.stages[2].head.layers[1].named_parameters())
    assert {k: v.shape for k, v in copy.items()} == {k: v.shape for k, v in block.items()}
    assert not torch.equal(copy["conv1.weight"], block["conv1.weight"])


def test_auglocal_is_cross_entropy_of_a_linear_map_of_the_pooled_copies():
    """Two stages: stage 0's net copies blocks 1 and 2, each a 3x3 BasicBlock halving the resolution with a
    1x1 conv-BN shortcut, then the mean over the map and the linear classifier; written out with convs."""
    torch.manual_seed(0)
    head = small_resnet("auglocal").stages[0].head
    assert head.copied == [1, 2]
    scramble_batch_norms(head)
    h, labels = torch.randn(4, 16, 16, 16), torch.tensor([3, 0, 9, 3])
    maps = basic_block_by_hand(basic_block_by_hand(h, head.layers[0], 2), head.layers[1], 2)
    logits = maps.mean((2, 3)) @ head.classifier.weight.T + head.classifier.bias
    out = head.loss(h, HeadInputs(labels=labels))
    torch.testing.assert_close(out.pred, logits)
    torch.testing.assert_close(out.loss, ce_by_hand(logits, labels))
    assert out.logs["acc"].item() == (logits.argmax(1) == labels).float().mean().item()


def test_the_last_stages_auglocal_is_a_linear_classifier_of_the_mean_patch_token():
    model = model_of(VIT, "auglocal")
    head, tokens, labels = model.stages[3].head, torch.randn(3, 65, 64), torch.tensor([1, 2, 3])
    logits = tokens[:, 1:].mean(1) @ head.classifier.weight.T + head.classifier.bias
    torch.testing.assert_close(head.loss(tokens, HeadInputs(prefix=1, labels=labels)).loss, ce_by_hand(logits, labels))


def test_on_vit_the_copies_are_blocks_at_the_reduced_width_after_a_linear_map():
    """nano: 64 wide, 2 heads of 32. Width 0.5: one head, 32 wide, a linear map from 64 first; stages copy
    blocks [2, 3], [2, 3], [3] and keep every token."""
    model = model_of(VIT, "auglocal", width=0.5)
    images, _, _ = inputs(model, 2)
    assert [s.head.copied for s in model.stages] == [[2, 3], [2, 3], [3], []]
    layers = model.stages[0].head.layers
    assert isinstance(layers[0], nn.Linear) and (layers[0].in_features, layers[0].out_features) == (64, 32)
    assert layers[1].attn.num_heads == 1 and isinstance(layers[-1], nn.LayerNorm)
    assert tuple(layers(model.encode(images)[0]).shape) == (2, 65, 32)
    assert not isinstance(model_of(VIT, "auglocal").stages[0].head.layers[0], nn.Linear)  # width 1: no map


# ---------------------------------------------------------------------------------------- man

def test_man_feeds_the_ema_copy_plus_the_bias_net_to_a_head_built_for_the_next_stage():
    """At init the EMA equals the next stage, so L_0 = dgl's CE on (stage 1's blocks + B_0)(h); the head is
    the next stage's kind (a dgl of its width, 64 channels); the last stage is its own dgl head."""
    torch.manual_seed(0)
    model = small_resnet("man")
    head, last = model.stages[0].head, model.stages[1].head
    assert isinstance(head.inner, DGLHead) and head.inner.mlp[0].in_features == 64 * 4
    assert isinstance(last.inner, DGLHead) and not hasattr(last, "ema") and not hasattr(last, "bias")
    h, labels = torch.randn(4, 16, 16, 16), torch.tensor([3, 0, 9, 3])
    scramble_batch_norms(model)
    with torch.no_grad():
        for live, average in zip(model.stages[1].blocks.parameters(), head.ema.parameters()):
            average.copy_(live)
    summed = model.stages[1].blocks(h) + head.bias(h)
    logits = head.inner.logits(summed, 0)
    out = head.loss(h, HeadInputs(labels=labels))
    torch.testing.assert_close(out.pred, logits)
    torch.testing.assert_close(out.loss, ce_by_hand(logits, labels))
    maps = torch.randn(4, 64, 4, 4)
    torch.testing.assert_close(last.loss(maps, HeadInputs(labels=labels)).loss,
                               ce_by_hand(last.inner.logits(maps, 0), labels))


def test_mans_head_takes_the_next_stages_depth_and_its_options_table():
    """infopro after the sum: stage k's head has stage k + 1's weights (1/3, 2/3 for stage 0 of 4) and
    reads `[model.head_options.infopro]`."""
    model = isolocal.create_model(RESNET, objective="man", head_options={"man": {"head": "infopro"},
                                                                        "infopro": {"decoder_width": 5}})
    inner = [s.head.inner for s in model.stages]
    assert all(isinstance(h, InfoProHead) and h.decoder.conv.conv.out_channels == 5 for h in inner)
    assert [h.task_weight for h in inner] == pytest.approx([1 / 3, 2 / 3, 1, 1])


@pytest.mark.parametrize("preset", [RESNET, VIT])
@pytest.mark.parametrize("head", ["auglocal", "man"])
def test_every_stage_predicts_and_logs_on_resnet_and_vit(preset, head):
    model = model_of(preset, head)
    images, _, labels = inputs(model, 4)
    out = model(images, labels=labels, return_pred=True)
    assert [tuple(p.shape) for p in out.preds] == [(4, 10)] * 4
    assert all(torch.isfinite(loss) and loss > 0 for loss in out.losses)
    assert all(logs.keys() == {"acc"} for logs in out.logs)


@pytest.mark.parametrize("preset", [RESNET, VIT])
@pytest.mark.parametrize("head", ["auglocal", "man"])
def test_no_gradient_of_a_stages_head_reaches_another_stage_or_the_ema(preset, head):
    """Isolated: stage k's loss reaches its own blocks and head, no earlier stage, and (man) neither the next
    stage it averages nor the average, whose parameters require no gradient and no optimizer holds."""
    model = model_of(preset, head)
    images, _, labels = inputs(model, 4)
    out = model(images, labels=labels)
    for k in range(model.num_stages):
        others = [p for j, s in enumerate(model.stages) if j != k for p in s.parameters() if p.requires_grad]
        assert all(g is None for g in torch.autograd.grad(out.losses[k], others, allow_unused=True, retain_graph=True))
        own = torch.autograd.grad(out.losses[k], list(model.stages[k].blocks.parameters()), retain_graph=True)
        assert any(g.abs().sum() > 0 for g in own)
        trained = [p for p in model.stages[k].head.parameters() if p.requires_grad]
        assert all(g is not None for g in torch.autograd.grad(out.losses[k], trained, retain_graph=True))
    if head == "man":
        frozen = [p for s in model.stages[:-1] for p in s.head.ema.parameters()]
        assert frozen and not any(p.requires_grad for p in frozen)
        optimized = {id(p) for g in build_optimizers(model, load_run_config(None, TINY).train)[0].param_groups
                     for p in g["params"]}
        assert not optimized & {id(p) for p in frozen}
        assert optimized >= {id(p) for p in model.stages[0].head.bias.parameters()}


@pytest.mark.parametrize("head", ["auglocal", "man"])
def test_the_same_seed_gives_the_same_model_and_losses(head):
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        model = model_of(VIT, head)
        images, _, labels = inputs(model, 4, seed=1)
        runs.append((model.state_dict(), torch.stack(model(images, labels=labels).losses).detach()))
    (a, la), (b, lb) = runs
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) and torch.equal(la, lb)


# ---------------------------------------------------------------------------------------- runs, the EMA, checkpoints

MAN_RUN = [f"preset={RESNET!r}", "model.objective='man'", "model.boundary='isolated'",
           "model.head_options.man.momentum=0.75"]


def test_after_a_step_the_ema_is_the_hand_average_of_its_start_and_the_stepped_next_stage(tmp_path):
    """One trainer step at momentum 0.75: every averaged parameter and BatchNorm statistic is 0.75 x its
    start (the next stage at init) + 0.25 x the next stage after the step; counters are the next stage's.
    At momentum 1 the copy stays at the init, statistics included: its forward changed nothing."""
    cfg = tiny(tmp_path / "run", *MAN_RUN, "train.max_steps=1")
    start = seeded_init(cfg).state_dict()
    train(cfg)
    after = load_state(tmp_path / "run" / LAST)["model"]
    for k in range(3):
        prefix, live = f"stages.{k}.head.ema.", f"stages.{k + 1}.blocks."
        names = [key[len(prefix):] for key in after if key.startswith(prefix)]
        assert names and all(after[live + n].shape == after[prefix + n].shape for n in names)
        assert any(not torch.equal(start[live + n], after[live + n]) for n in names)  # the next stage moved
        for n in names:
            if n.endswith("num_batches_tracked"):
                assert torch.equal(after[prefix + n], after[live + n])
            else:
                torch.testing.assert_close(after[prefix + n], 0.75 * start[live + n] + 0.25 * after[live + n])
    frozen = tiny(tmp_path / "frozen", *MAN_RUN, "train.max_steps=2", "model.head_options.man.momentum=1.0")
    train(frozen)
    saved = load_state(tmp_path / "frozen" / LAST)["model"]
    for key in (key for key in saved if ".head.ema." in key and not key.endswith("num_batches_tracked")):
        k, name = int(key.split(".")[1]), key.split(".head.ema.")[1]
        assert torch.equal(saved[key], start[f"stages.{k + 1}.blocks.{name}"]), key


@pytest.mark.parametrize("preset, head", [(RESNET, "man"), (VIT, "auglocal")])
def test_a_resumed_run_continues_identically_and_the_checkpoint_holds_the_ema(tmp_path, preset, head):
    """4 isolated steps in one go, and 2 + 2 with a resume: the same losses bit for bit and the same final
    state, the EMA included; the run directory loads as the whole model with those tensors."""
    opts = [f"preset={preset!r}", f"model.objective={head!r}", "model.boundary='isolated'",
            *(["model.head_options.man.momentum=0.9"] if head == "man" else [])]
    train(tiny(tmp_path / "whole", *opts, "train.max_steps=4"))
    train(tiny(tmp_path / "parts", *opts, "train.max_steps=2"))
    train(tiny(tmp_path / "parts", *opts, "train.max_steps=4"), resume=True)
    whole = step_losses(tmp_path / "whole")
    assert len(whole) == 4 and whole == step_losses(tmp_path / "parts")
    a, b = (load_state(tmp_path / run / LAST)["model"] for run in ("whole", "parts"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    kept = ".head.ema." if head == "man" else ".head.layers."
    assert any(kept in key for key in a)
    loaded = load_model(tmp_path / "whole").state_dict()
    assert loaded.keys() == a.keys() and all(torch.equal(loaded[k], a[k]) for k in a)


# ---------------------------------------------------------------------------------------- refusals and contracts

@pytest.mark.parametrize("head, message", [
    ("auglocal", ("model.objective 'auglocal' builds copies of the backbone's later layers, which the swin family "
                  "does not offer; use it on a resnet or vit model")),
    ("man", ("model.objective 'man' reads the next stage's live layers, which the swin family does not offer; use "
             "it on a resnet or vit model"))])
def test_swin_is_refused_by_name(head, message):
    with pytest.raises(ConfigError, match=message):
        isolocal.create_model(SWIN, objective=head)


def test_man_refuses_a_pipeline_in_one_line_before_any_work(tmp_path):
    cfg = tiny(tmp_path, *MAN_RUN, "pipeline.stages=2")
    with pytest.raises(ConfigError, match=r"^model.objective 'man' reads the next stage's live parameters, which a "
                                          r"pipeline rank does not hold when the next stage trains on another rank; "
                                          r"train it with `isolocal pretrain`"):
        check_pipeline(cfg, 2)
    assert check_pipeline(tiny(tmp_path, f"preset={RESNET!r}", "model.objective='auglocal'",
                               "pipeline.stages=2"), 2) == (2, 1)


def test_the_view_gives_copies_of_later_layers_only_and_the_live_next_stage_only_to_heads_needing_it():
    model = model_of(RESNET, "auglocal")
    view = model.head_view(1)
    assert view.stage_layers == (range(0, 4), range(4, 8), range(8, 12), range(12, 15))
    assert view.later_layers == range(8, 15)
    for layers in ([], [7, 9], [9, 8], [9, 9], [15]):
        with pytest.raises(ValueError, match=r"layers to copy must be increasing indices of the layers after stage 1 "
                                             r"\(8 to 14\)"):
            view.copy_layers(layers)
    with pytest.raises(ValueError, match="head 'auglocal' reads the next stage's layers without needing 'next_stage'"):
        view.next_stage()
    man = model_of(RESNET, "man")
    assert man.head_view(0).next_stage()[0] is man.stages[1].blocks[0]
    with pytest.raises(ValueError, match="stage 3 is the last one: it has no next stage"):
        man.head_view(3).next_stage()
    assert not any(p is q for p in man.stages[0].head.parameters() for q in man.stages[1].parameters())


@pytest.mark.parametrize("override, message", [
    ("model.head_options.auglocal.depth=0", "model.head_options.auglocal.depth must be >= 1, got 0"),
    ("model.head_options.auglocal.depth_decay=1.5", "model.head_options.auglocal.depth_decay must be <= 1, got 1.5"),
    ("model.head_options.auglocal.width=0", "model.head_options.auglocal.width must be > 0, got 0"),
    ("model.head_options.man.head='contrastive'",
     "model.head_options.man.head must be one of 'classify', 'dgl', 'infopro'; got 'contrastive'"),
    ("model.head_options.man.momentum=1.5", "model.head_options.man.momentum must be <= 1, got 1.5"),
])
def test_bad_options_are_refused_naming_the_value_and_the_valid_range(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_run_config(None, [*TINY, override])


def test_the_class_count_of_mans_head_is_checked_against_the_data(tmp_path):
    cfg = tiny(tmp_path, *MAN_RUN, "model.head_options.dgl.num_classes=4")
    with pytest.raises(ValueError, match=r"model.head_options.dgl.num_classes \(4\) is smaller than the 10 classes"):
        build_train_dataset(cfg)


# ---------------------------------------------------------------------------------------- the heads' own accuracy

def test_head_accuracy_scores_every_head_that_predicts_classes():
    """dgl, infopro "ce", auglocal and man (over dgl) predict classes; contrastive, infopro's contrastive task
    and man over it do not. Each score is a hand count of argmax(logits) == label in eval mode."""
    torch.manual_seed(0)
    model = isolocal.create_model(VIT, objective=["dgl", "infopro", "auglocal", "man"]).train()
    assert classify_stages(model) == [0, 1, 2, 3]
    projecting = isolocal.create_model(VIT, objective=["contrastive", "infopro", "auglocal", "man"], head_options={
        "infopro": {"task": "contrastive"}, "man": {"head": "infopro"}})
    assert classify_stages(projecting) == [2]
    data = SyntheticImages(24, 32, 1, seed=3)
    accs = head_accuracy(model, data, batch_size=8, progress=False)
    images = torch.stack([data[i][0] for i in range(len(data))])
    labels = torch.tensor([data[i][1] for i in range(len(data))])
    model.eval()
    with torch.no_grad():
        feats = model.encode(images)
        for k in (2, 3):
            head = model.stages[k].head
            inner = head.classifier(head.layers(feats[k])[:, 1:].mean(1)) if k == 2 else \
                head.inner.logits(head.auxiliary(feats[k]), 1)
            assert accs[k] == pytest.approx(100.0 * (inner.argmax(1) == labels).float().mean().item())
    assert isinstance(model.stages[2].head, AugLocalHead) and isinstance(model.stages[3].head, MANHead)


# ---------------------------------------------------------------------------------------- pipeline

@pytest.mark.slow
def test_a_two_rank_pipeline_of_auglocal_gives_the_single_process_run(tmp_path):
    """2 DeepSpeed ranks (gloo), isolated and global: the copies are built from the config on every rank, and
    after 3 steps the parameters and logged losses equal one process's."""
    from test_pipeline import assert_pipeline_equals_single_process

    assert_pipeline_equals_single_process(tmp_path, [
        *TINY, "data.synthetic_size=64", "train.batch_size=16", "train.max_steps=3", "train.base_lr=0.01",
        "pipeline.micro_batches=2", "pipeline.timeout_s=60", f"preset={RESNET!r}", "model.objective='auglocal'"])
