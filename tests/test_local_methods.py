"""The supervised local-learning heads `dgl` (DGL's auxiliary classifier) and `infopro` (InfoPro's task term
plus image reconstruction): their losses written out by hand, shapes on ResNet, ViT and Swin stages,
isolation, determinism, an exact resume, the "image" and "grid" needs and the stage index a build is
given, bad options, and a 2-rank DeepSpeed pipeline equal to one process."""
from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import isolocal
from isolocal.config import ConfigError
from isolocal.config.load import load_run_config
from isolocal.heads import (DGLHead, DGLOptions, HeadInputs, HeadOutput, InfoProHead, InfoProOptions, StageHead,
                            info_nce, register_head, supervised_nce)
from isolocal.io.checkpoint import LAST, load_state
from isolocal.io.load import load_model
from isolocal.testing.by_hand import bn_relu_by_hand, ce_by_hand
from isolocal.train import train

sys.path.insert(0, str(Path(__file__).parent))
from test_heads import TINY, inputs, tiny  # noqa: E402

RESNET, VIT, SWIN = "resnet32_k4", "localmim_vit_nano", "localmim_swin_nano"
INFOPRO_CONTRAST = ("infopro", {"task": "contrastive", "proj_dim": 8})
HEADS = {"dgl": ("dgl", {}), "dgl_cnn": ("dgl", {"convs": 1}), "infopro": ("infopro", {}),
         "infopro_contrastive": INFOPRO_CONTRAST}


def model_of(preset: str, case: str, boundary: str = "isolated") -> isolocal.StagewiseEncoder:
    name, options = HEADS[case]
    return isolocal.create_model(preset, objective=name, boundary=boundary, head_options={name: options})


# ---------------------------------------------------------------------------------------- losses by hand

def test_dgl_is_cross_entropy_of_an_mlp_on_the_2x2_average_pooled_map():
    head = DGLHead(4, DGLOptions(num_classes=3, head_hidden=5))
    maps, labels = torch.randn(2, 4, 6, 6), torch.tensor([2, 0])
    pooled = maps.reshape(2, 4, 2, 3, 2, 3).mean((3, 5))  # 2 x 2 cells of 3 x 3 pixels
    (w1, b1), (w2, b2), (w3, b3) = ((layer.weight, layer.bias) for layer in head.mlp if hasattr(layer, "weight"))
    hidden = (pooled.flatten(1) @ w1.T + b1).clamp(min=0)
    logits = (hidden @ w2.T + b2).clamp(min=0) @ w3.T + b3
    out = head.loss(maps, HeadInputs(labels=labels))
    torch.testing.assert_close(out.pred, logits)
    torch.testing.assert_close(out.loss, ce_by_hand(logits, labels))
    assert out.logs["acc"].item() == (logits.argmax(1) == labels).float().mean().item()
    with pytest.raises(ValueError, match="the dgl head needs labels"):
        head.loss(maps, HeadInputs())


def test_tokens_are_laid_out_on_their_patch_grid_in_raster_order():
    """A CLS token and 4 x 4 patch tokens in raster order give the head the map they came from."""
    head = DGLHead(4, DGLOptions(num_classes=3, convs=1))
    maps, labels = torch.randn(2, 4, 4, 4), torch.tensor([1, 2])
    raster = torch.stack([maps[:, :, i, j] for i in range(4) for j in range(4)], 1)  # (2, 16, 4)
    tokens = torch.cat([torch.randn(2, 1, 4), raster], 1)
    torch.testing.assert_close(head.loss(tokens, HeadInputs(prefix=1, labels=labels)).pred,
                               head.loss(maps, HeadInputs(labels=labels)).pred)
    with pytest.raises(ValueError, match="got 15 tokens after 1 non-grid ones, which is not a square"):
        head.loss(tokens[:, :16], HeadInputs(prefix=1, labels=labels))


def test_infopro_is_the_depth_weighted_sum_of_cross_entropy_and_image_mse():
    """Stage 1 of 3: weights (0.5, 0.5). Task: the classify net on pooled tokens; reconstruction: the 3 x 3
    token grid upsampled bilinearly to the image, conv-BN-ReLU, conv, MSE to the normalized image."""
    torch.manual_seed(0)
    head = InfoProHead(6, 1, InfoProOptions(num_classes=3, decoder_width=4), stage=1, stages=3)
    assert (head.task_weight, head.recon_weight) == (0.5, 0.5)
    tokens, labels, images = torch.randn(2, 10, 6), torch.tensor([0, 2]), torch.randn(2, 1, 12, 12)
    mlp = head.task_net.mlp
    logits = F.gelu(tokens[:, 1:].mean(1) @ mlp[0].weight.T + mlp[0].bias) @ mlp[2].weight.T + mlp[2].bias
    grid = tokens[:, 1:].reshape(2, 3, 3, 6).permute(0, 3, 1, 2)
    up = F.interpolate(grid, size=(12, 12), mode="bilinear", align_corners=False)
    dec = head.decoder
    hidden = bn_relu_by_hand(F.conv2d(up, dec.conv.conv.weight, padding=1), dec.conv.bn)
    recon = F.conv2d(hidden, dec.out.weight, dec.out.bias, padding=1)
    task, mse = ce_by_hand(logits, labels), (recon - images).pow(2).mean()
    out = head.loss(tokens, HeadInputs(prefix=1, labels=labels, images=images))
    torch.testing.assert_close(out.loss, 0.5 * task + 0.5 * mse)
    torch.testing.assert_close(out.logs["task"], task)
    torch.testing.assert_close(out.logs["recon"], mse)
    with pytest.raises(ValueError, match="the infopro head needs labels and the input images"):
        head.loss(tokens, HeadInputs(prefix=1, labels=labels))


def test_supervised_contrastive_averages_every_same_label_pair_and_is_info_nce_for_two_views():
    g = torch.Generator().manual_seed(0)
    z, labels, t = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.tensor([0, 1, 0, 0, 2]), 0.5
    cos = F.cosine_similarity(z[:, None], z[None], dim=2)
    terms = [-math.log(math.exp(cos[i, j] / t) / sum(math.exp(cos[i, k] / t) for k in range(5) if k != i))
             for i in range(5) for j in range(5) if i != j and labels[i] == labels[j]]
    assert len(terms) == 6  # the ordered pairs of the three 0s
    assert float(supervised_nce(z.float(), labels, t)) == pytest.approx(sum(terms) / 6, rel=1e-5)
    assert float(supervised_nce(z.float(), torch.arange(5), t)) == 0.0  # no positive pair
    pairs = torch.randn(6, 4, generator=g)
    torch.testing.assert_close(supervised_nce(pairs, torch.arange(3).repeat(2), t), info_nce(pairs, t))


def test_infopro_weights_move_linearly_with_depth_and_the_build_learns_its_stage():
    model = isolocal.create_model(RESNET, objective="infopro")
    weights = [w for s in model.stages for w in (s.head.task_weight, s.head.recon_weight)]
    assert weights == pytest.approx([0, 1, 1 / 3, 2 / 3, 2 / 3, 1 / 3, 1, 0])
    options = InfoProOptions(task_weight_first=0.5, task_weight_last=0.5, recon_weight_first=5, recon_weight_last=1)
    assert options.weights(2, 5) == pytest.approx((0.5, 3.0)) and options.weights(0, 1) == (0.5, 1.0)
    with pytest.raises(ValueError, match=r"stage must be in \[0, 4\], got 5"):
        options.weights(5, 5)
    mixed = isolocal.create_model(VIT, objective=["classify", "classify", "infopro", "infopro"])
    assert [w for s in mixed.stages[2:] for w in (s.head.task_weight, s.head.recon_weight)] == pytest.approx(
        [2 / 3, 1 / 3, 1, 0])


# ---------------------------------------------------------------------------------------- in models

@pytest.mark.parametrize("preset", [RESNET, VIT, SWIN])
@pytest.mark.parametrize("case", sorted(HEADS))
def test_every_stage_predicts_and_logs_on_resnet_vit_and_swin(preset, case):
    model = model_of(preset, case)
    images, _, labels = inputs(model, 4)
    out = model(images, labels=labels, return_pred=True)
    width = 8 if case == "infopro_contrastive" else 10
    assert [tuple(p.shape) for p in out.preds] == [(4, width)] * model.num_stages
    assert all(torch.isfinite(loss) and loss > 0 for loss in out.losses)
    keys = {"dgl": {"acc"}, "dgl_cnn": {"acc"}, "infopro": {"acc", "task", "recon"},
            "infopro_contrastive": {"task", "recon"}}
    assert all(logs.keys() == keys[case] for logs in out.logs)


@pytest.mark.parametrize("preset", [RESNET, VIT])
@pytest.mark.parametrize("case", ["dgl", "infopro"])
def test_a_stages_head_reaches_its_own_blocks_and_no_earlier_stage_when_isolated(preset, case):
    model = model_of(preset, case)
    images, _, labels = inputs(model, 4)
    out = model(images, labels=labels)
    for k in range(1, model.num_stages):
        below = [p for s in model.stages[:k] for p in s.parameters() if p.requires_grad]
        assert all(g is None for g in torch.autograd.grad(out.losses[k], below, allow_unused=True, retain_graph=True))
        own = torch.autograd.grad(out.losses[k], list(model.stages[k].blocks.parameters()), retain_graph=True)
        assert any(g.abs().sum() > 0 for g in own)
    model.set_boundary("global")
    first = list(model.stages[0].blocks.parameters())
    grads = torch.autograd.grad(model(images, labels=labels).losses[-1], first, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("case", ["dgl", "infopro_contrastive"])
def test_the_same_seed_gives_the_same_losses(case):
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        model = model_of(VIT, case)
        images, _, labels = inputs(model, 4, seed=1)
        runs.append(torch.stack(model(images, labels=labels).losses).detach())
    assert torch.equal(*runs)


def test_a_head_needing_the_image_reads_what_the_encoder_reads_and_its_build_gets_its_stage(own_head_registry):
    """The "image" need: the images the model encodes, both views stacked when a head contrasts them;
    a build declaring `stage` gets the stage's index. Without the need a head reads no image."""
    class Echo(StageHead):
        def __init__(self, stage: int):
            super().__init__()
            self.stage = stage

        def loss(self, features: torch.Tensor, inputs: HeadInputs) -> HeadOutput:
            return HeadOutput(features.float().mean(), inputs.images, {"stage": float(self.stage)})

    def build(cfg, dim, stage):
        return Echo(stage)

    register_head("echo", {"image"}, build)
    model = isolocal.create_model(VIT, objective=["echo", "contrastive", "echo", "classify"])
    images, _, labels = inputs(model, 3)
    out = model(images, labels=labels, return_pred=True)
    assert images.shape[0] == 6 and out.preds[0] is images and out.preds[2] is images
    assert [logs.get("stage") for logs in out.logs] == [0.0, None, 2.0, None]
    register_head("echo", set(), build)
    assert isolocal.create_model(VIT, objective="echo")(images[:3]).preds is None
    assert isolocal.create_model(VIT, objective="echo")(images[:3], return_pred=True).preds == [None] * 4


def test_grid_heads_beside_a_masked_head_are_refused_before_any_weights():
    cfg = dataclasses.replace(isolocal.preset_config(VIT), objective=["mim", "mim", "dgl", "infopro"])
    with pytest.raises(ConfigError, match=r"'dgl' / 'infopro' reads every token of its stage's grid, but 'mim' "
                                          r"\(stages \[0, 1\]\) needs a mask"):
        isolocal.StagewiseEncoder.check_config(cfg)


@pytest.mark.parametrize("override, message", [
    ("model.head_options.dgl.pooled=0", "model.head_options.dgl.pooled must be >= 1, got 0"),
    ("model.head_options.dgl.mlp_layers=0", "model.head_options.dgl.mlp_layers must be >= 1, got 0"),
    ("model.head_options.infopro.task='mse'",
     "model.head_options.infopro.task must be one of 'ce', 'contrastive'; got 'mse'"),
    ("model.head_options.infopro.recon_weight_first=-1",
     "model.head_options.infopro.recon_weight_first must be >= 0, got -1.0"),
    ("model.head_options.infopro.task_weight_last=0", "task_weight_last and recon_weight_last are both 0"),
    ("model.head_options.infopro.temperature=0", "model.head_options.infopro.temperature must be > 0, got 0"),
])
def test_bad_options_are_refused_naming_the_value_and_the_valid_range(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_run_config(None, [*TINY, override])


# ---------------------------------------------------------------------------------------- runs

def step_losses(run: Path) -> list[list[float]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss_stage"] for r in records if r["kind"] == "step"]


@pytest.mark.parametrize("preset, head, options", [
    (RESNET, "dgl", []), (VIT, "infopro", []), (RESNET, "infopro", ["model.head_options.infopro.task='contrastive'"])])
def test_a_resumed_run_logs_the_uninterrupted_runs_losses_and_loads_whole(tmp_path, preset, head, options):
    """4 isolated steps in one go, and 2 + 2 with a resume: the same losses bit for bit and the same final
    weights; the run directory loads as the whole model, heads included."""
    opts = [f"preset={preset!r}", f"model.objective={head!r}", "model.boundary='isolated'", *options]
    train(tiny(tmp_path / "whole", *opts, "train.max_steps=4"))
    train(tiny(tmp_path / "parts", *opts, "train.max_steps=2"))
    train(tiny(tmp_path / "parts", *opts, "train.max_steps=4"), resume=True)
    whole = step_losses(tmp_path / "whole")
    assert len(whole) == 4 and whole == step_losses(tmp_path / "parts")
    a, b = (load_state(tmp_path / run / LAST)["model"] for run in ("whole", "parts"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    loaded = load_model(tmp_path / "whole").state_dict()
    assert any(".head." in key for key in a) and all(torch.equal(loaded[k], a[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("preset, head", [(RESNET, "dgl"), (VIT, "infopro")])
def test_a_two_rank_pipeline_gives_the_single_process_run(tmp_path, preset, head):
    """2 DeepSpeed ranks (gloo), isolated and global: the images reach the second rank's heads, and
    after 3 steps the parameters and logged losses equal one process's (`assert_pipeline_equals_single_process`)."""
    from test_pipeline import assert_pipeline_equals_single_process

    assert_pipeline_equals_single_process(tmp_path, [
        *TINY, "data.synthetic_size=64", "train.batch_size=16", "train.max_steps=3", "train.base_lr=0.01",
        "pipeline.micro_batches=2", "pipeline.timeout_s=60", f"preset={preset!r}", f"model.objective={head!r}"])
