"""Local objectives as plug-ins (`isolocal.heads`): each head's loss by hand, isolation under autograd for
every head, mixed objectives, labels and two views through the trainer, validation before any work,
analysis on a non-MIM model, and the MIM path unchanged by the heads."""
from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import isolocal
from isolocal.cli import main
from isolocal.config import RunConfig, to_dict
from isolocal.data import MultiView, SyntheticImages, build_dataset, views_first
import isolocal.heads.plan
import isolocal.models.vit
from isolocal.heads import (HEADS, ClassifyHead, ContrastiveHead, HeadInputs, HeadOutput, StageHead, StagePlan,
                            info_nce, pool, register_head)
from isolocal.config.load import load_run_config
from isolocal.train import Trainer, train
from isolocal.train.step import backward_step
from isolocal.testing.launch import torchrun_two

NANO = "localmim_vit_nano"  # 4 stages of one block, 64-d, 32 px gray images, 8x8 tokens
TINY = ["data.name=synthetic", "data.synthetic_size=48", "train.batch_size=8", "train.epochs=1",
        "train.log_every=1", "train.warmup_epochs=0.5"]
REPO = Path(isolocal.__file__).resolve().parents[1]


def tiny(out: Path, *overrides: str) -> RunConfig:
    cfg = load_run_config(None, [*TINY, *overrides])
    cfg.out_dir = str(out)
    return cfg


def inputs(model: isolocal.StagewiseEncoder, samples: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images, mask, labels) for `samples` samples: images hold `model.views` views of each."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(samples * model.views, 1, 32, 32, generator=g)
    return images, model.random_mask(len(images), g), torch.randint(0, 10, (samples,), generator=g)


# ---------------------------------------------------------------------------------------- each head by hand

def test_info_nce_equals_a_hand_written_reference():
    """NT-Xent written out per row: -log(exp(cos(i, pos)/t) / sum over j != i of exp(cos(i, j)/t))."""
    g = torch.Generator().manual_seed(0)
    z, t, n = torch.randn(6, 5, generator=g, dtype=torch.float64), 0.3, 3
    terms = []
    for i in range(2 * n):
        cos = [float(F.cosine_similarity(z[i], z[j], dim=0)) for j in range(2 * n)]
        pos = (i + n) % (2 * n)
        terms.append(-math.log(math.exp(cos[pos] / t) / sum(math.exp(cos[j] / t) for j in range(2 * n) if j != i)))
    assert float(info_nce(z.float(), t)) == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    swapped = z[[0, 1, 2, 4, 3, 5]]  # pairs (1, 4) and (2, 3) now match wrong views: a higher loss
    assert float(info_nce(swapped.float(), t)) > float(info_nce(z.float(), t))


def test_classify_head_is_cross_entropy_of_an_mlp_on_pooled_tokens_or_maps():
    torch.manual_seed(0)
    head = ClassifyHead(dim=8, num_classes=3, hidden=6)
    features, labels = torch.randn(4, 5, 8), torch.tensor([0, 2, 1, 2])
    pooled = features[:, 1:].mean(1)  # the CLS token (prefix 1) is not on the grid
    w1, b1, w2, b2 = head.mlp[0].weight, head.mlp[0].bias, head.mlp[2].weight, head.mlp[2].bias
    logits = F.gelu(pooled @ w1.T + b1) @ w2.T + b2
    expected = -torch.log_softmax(logits, 1)[torch.arange(4), labels].mean()
    out = head.loss(features, HeadInputs(prefix=1, labels=labels))
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(out.pred, logits)
    maps = torch.randn(4, 8, 3, 3)  # a (B, C, H, W) stage output (CNN stages) is pooled over H, W
    on_map = head.loss(maps, HeadInputs(labels=labels))
    torch.testing.assert_close(on_map.pred, head.mlp(maps.mean((2, 3))))


def test_head_defaults_pool_every_token_of_one_view_and_size_the_mlp_by_the_stage():
    """HeadInputs() means no prefix token and one view; hidden = 0 means the stage's width; the classify
    head logs its batch accuracy."""
    torch.manual_seed(0)
    head = ClassifyHead(dim=8, num_classes=3)
    assert head.mlp[0].out_features == 8 and ContrastiveHead(8, 4, 0.5).proj[0].out_features == 8
    features, labels = torch.randn(4, 5, 8), torch.tensor([0, 2, 1, 2])
    out = head.loss(features, HeadInputs(labels=labels))
    torch.testing.assert_close(out.pred, head.mlp(features.mean(1)))
    assert out.logs["acc"].item() == pytest.approx((out.pred.argmax(1) == labels).float().mean().item())
    assert not out.logs["acc"].requires_grad  # a log: no graph kept alive
    with pytest.raises(ValueError, match="got views=1"):
        ContrastiveHead(8, 4, 0.5).loss(torch.randn(4, 5, 8), HeadInputs())


def test_info_nce_normalises_in_fp32_under_bf16_autocast():
    """`train.amp = "bf16"` runs heads under autocast (CPU too): the projections come out in bf16 and
    InfoNCE must normalise them in fp32 (bf16 normalisation shifts this loss by ~3e-3)."""
    torch.manual_seed(0)
    head = ContrastiveHead(16, 8, 0.2)
    features = torch.randn(12, 5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = F.normalize(head.proj(features[:, 1:].mean(1)).float(), dim=1)
        sim = (z @ z.T / 0.2).masked_fill(torch.eye(12, dtype=torch.bool), float("-inf"))
        expected = F.cross_entropy(sim, torch.arange(12).roll(6))
        loss = head.loss(features, HeadInputs(prefix=1, views=2)).loss
    assert loss.item() == expected.item()


def test_check_config_refuses_an_unknown_objective_without_building_the_model():
    cfg = isolocal.preset_config(NANO)
    cfg.objective = "byol"
    with pytest.raises(ValueError, match="model.objective 'byol' is not a head"):
        isolocal.StagewiseEncoder.check_config(cfg)


def test_the_stage_plan_is_resolved_once_from_the_config(monkeypatch):
    """`StagePlan.from_config`: each stage's head, each boundary's alpha, what the heads need together and the
    views per sample. The model keeps it (`model.plan`): a forward never reads `model.objective` or
    `model.boundary` again, and `set_boundary` changes only the alphas."""
    cfg = dataclasses.replace(isolocal.preset_config(NANO), objective=["mim", "classify", "contrastive", "mim"],
                              boundary=["isolated", 0.5, "global"])
    plan = StagePlan.from_config(cfg)
    assert plan.objectives == ("mim", "classify", "contrastive", "mim") and plan.alphas == (0.0, 0.5, 1.0)
    assert plan.needs == {"target", "mask", "labels", "views"} and plan.views == 2 and not plan.isolated
    assert plan.target_stages == [0, 3] and plan.heads_needing("labels") == ["'classify'"]
    model = isolocal.StagewiseEncoder(cfg)
    assert model.plan == plan and isinstance(model.stages[1].head, ClassifyHead) and hasattr(model.stages[3], "decoder")

    def parsed_again(*args):
        raise AssertionError("the config was parsed again")

    monkeypatch.setattr(isolocal.heads.plan, "parse_objectives", parsed_again)
    monkeypatch.setattr(isolocal.heads.plan, "parse_boundaries", parsed_again)
    images, mask, labels = inputs(model, 2)
    assert len(model(images, mask, labels=labels).losses) == 4
    assert model.objectives == ["mim", "classify", "contrastive", "mim"] and model.alphas == [0.0, 0.5, 1.0]
    assert model.views == 2
    monkeypatch.undo()
    model.set_boundary("isolated")
    assert model.plan.alphas == (0.0, 0.0, 0.0) and model.plan.objectives == plan.objectives and model.isolated


@pytest.mark.parametrize("field, value, message", [
    ("objective", "byol",
     "model.objective 'byol' is not a head; valid heads: auglocal, classify, contrastive, dgl, infopro, man, mim"),
    ("boundary", "half", r"boundary 'half' is not valid; use 'global', 'isolated' or an alpha in \[0, 1\]"),
    ("boundary", [0.5, 0.5], r"boundary list must have one entry per boundary \(3\), got 2"),
])
def test_a_bad_objective_or_boundary_fails_in_the_plan_before_any_weights(monkeypatch, field, value, message):
    cfg = dataclasses.replace(isolocal.preset_config(NANO), **{field: value})
    with pytest.raises(ValueError, match=message):
        StagePlan.from_config(cfg)

    def built(*args, **kwargs):
        raise AssertionError("weights were built before the config was checked")

    monkeypatch.setattr(isolocal.models.vit, "PatchEmbed", built)
    with pytest.raises(ValueError, match=message):
        isolocal.StagewiseEncoder(cfg)


def test_a_head_needing_the_target_is_the_familys_decoder_and_no_other_is():
    """The registry says which heads reconstruct (`mim`: built by the family, kept as `stage.decoder`)."""
    with pytest.raises(ValueError, match="a head that needs 'target' is the model family's decoder"):
        register_head("rec", frozenset({"target"}), lambda cfg, dim: ClassifyHead(dim, 2))
    with pytest.raises(ValueError, match="any other head needs a build function"):
        register_head("nobuild", frozenset({"labels"}), None)
    assert "rec" not in HEADS and "nobuild" not in HEADS
    assert [name for name, head in HEADS.items() if head.reconstructs] == ["mim"]


def test_contrastive_head_is_info_nce_of_the_projected_pooled_views():
    torch.manual_seed(0)
    head = ContrastiveHead(dim=8, proj_dim=4, temperature=0.5)
    features = torch.randn(6, 5, 8)  # 3 samples x 2 views, CLS first
    out = head.loss(features, HeadInputs(prefix=1, views=2))
    torch.testing.assert_close(out.loss, info_nce(head.proj(features[:, 1:].mean(1)), 0.5))
    with pytest.raises(ValueError, match="two views stacked along the batch"):
        head.loss(features[:5], HeadInputs(prefix=1, views=2))


# ---------------------------------------------------------------------------------------- isolation

OBJECTIVES = ["mim", "classify", "contrastive", ["mim", "mim", "classify", "classify"],
              ["mim", "contrastive", "mim", "classify"]]


@pytest.mark.parametrize("objective", OBJECTIVES, ids=str)
def test_isolation_holds_under_autograd_for_every_head(objective):
    """Isolated: stage k's head loss has no gradient path to any stage < k, and does reach stage k's own
    parameters; global: the top loss reaches stage 0 (so the check can fail)."""
    model = isolocal.create_model(NANO, boundary="isolated", objective=objective)
    images, mask, labels = inputs(model, 4)
    out = model(images, mask, labels=labels)
    for k in range(1, model.num_stages):
        below = [p for s in model.stages[:k] for p in s.parameters() if p.requires_grad]
        grads = torch.autograd.grad(out.losses[k], below, allow_unused=True, retain_graph=True)
        assert all(g is None for g in grads), f"stage {k}'s loss reached an earlier stage"
        own = torch.autograd.grad(out.losses[k], list(model.stages[k].blocks.parameters()), retain_graph=True)
        assert any(g.abs().sum() > 0 for g in own)
    model.set_boundary("global")
    out = model(images, mask, labels=labels)
    first = [p for p in model.stages[0].parameters() if p.requires_grad]
    grads = torch.autograd.grad(out.losses[-1], first, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.slow
def test_classify_heads_learn_separable_synthetic_classes_above_chance():
    """4 isolated stages with auxiliary classifiers on 4 grating classes: after 40 steps every stage's
    classifier beats chance (25%) on held-out images, the top one by far."""
    model = isolocal.create_model(NANO, boundary="isolated", objective="classify", num_classes=4)
    train_set, test_set = (SyntheticImages(n, 32, 1, num_classes=4, seed=0, train=split) for n, split in
                           ((64, True), (64, False)))
    images = torch.stack([train_set[i][0] for i in range(64)])
    labels = torch.tensor(train_set.targets)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        opt.zero_grad()
        backward_step(model, images, model.random_mask(64, g), labels=labels)
        opt.step()
    model.eval()
    test_images, test_labels = torch.stack([test_set[i][0] for i in range(64)]), torch.tensor(test_set.targets)
    with torch.no_grad():
        out = model(test_images, model.random_mask(64, g), return_pred=True, labels=test_labels)
    accuracy = [float((logits.argmax(1) == test_labels).float().mean()) for logits in out.preds]
    assert min(accuracy) > 0.35 and accuracy[-1] > 0.6, accuracy


# ---------------------------------------------------------------------------------------- the MIM path

# Per-stage losses of the code before the heads (commit 8160c6d), same inputs as below.
BEFORE = {
    "localmim_vit_nano": [0.17248238623142242, 0.1698332279920578, 0.4795133173465729, 0.4944463074207306],
    "mae_vit_nano": [1.1711198091506958],
}


@pytest.mark.parametrize("preset", sorted(BEFORE))
def test_mim_losses_equal_the_code_before_the_heads(preset):
    torch.manual_seed(0)
    model = isolocal.create_model(preset)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(4, 1, 32, 32, generator=g)
    losses = torch.stack(model(images, model.random_mask(4, g)).losses).detach().tolist()
    assert losses == pytest.approx(BEFORE[preset], rel=1e-6, abs=0)


@pytest.mark.parametrize("boundary", ["global", "isolated"])
def test_other_heads_leave_the_mim_stages_numbers_unchanged(boundary):
    """The same encoder and decoders with classify / contrastive heads on top: the MIM stages' losses
    are bit-identical, and isolated, so are their gradients (global, the top heads' losses add theirs)."""
    mim = isolocal.create_model(NANO, boundary=boundary)
    mixed = isolocal.create_model(NANO, boundary=boundary, objective=["mim", "mim", "classify", "contrastive"])
    missing, unexpected = mixed.load_state_dict(mim.state_dict(), strict=False)
    assert all(".decoder." in key for key in unexpected) and all(".head." in key for key in missing)
    images, mask, labels = inputs(mixed, 3)
    backward_step(mim, images, mask)
    losses = backward_step(mixed, images, mask, labels=labels)
    mim_losses = torch.stack(mim(images, mask).losses[:2]).detach()
    assert torch.equal(losses[:2], mim_losses)
    grads = [[p.grad for p in model.stages[0].parameters() if p.requires_grad] for model in (mim, mixed)]
    same = all(torch.equal(a, b) for a, b in zip(*grads))
    assert same == (boundary == "isolated")


# ---------------------------------------------------------------------------------------- data and runs

def test_two_views_are_independent_augmentations_stacked_view_first():
    data, _, _ = build_dataset("fashion_mnist", None, train=True, img_size=32, in_chans=1, transform_train=True)
    torch.manual_seed(0)
    pair, label = MultiView(data, 2)[0]
    assert pair.shape == (2, 1, 32, 32) and label == data[0][1] and not torch.equal(pair[0], pair[1])
    batch = torch.arange(3 * 2).reshape(3, 2, 1, 1, 1).float()  # sample s, view v = 2 s + v
    assert views_first(batch).flatten().tolist() == [0, 2, 4, 1, 3, 5]  # [view 1 of all; view 2 of all]


@pytest.mark.parametrize("objective", ["classify", "contrastive"])
def test_runs_train_and_log_per_stage_losses(tmp_path, objective):
    """Isolated classify / contrastive runs: labels reach the heads, two views per sample reach the encoder
    (the micro-batch holds 2 x 8 images), every stage logs a finite loss, and a second run repeats them."""
    seen = []
    cfg = tiny(tmp_path / "a", f"model.objective={objective!r}", "model.boundary='isolated'", "train.max_steps=3")
    trainer = Trainer(cfg, on_batch=lambda images, mask: seen.append(images.shape[0]))
    try:
        trainer.fit()
    finally:
        trainer.close()
    assert seen == [16 if objective == "contrastive" else 8] * 3
    steps = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss_stage"] for r in steps if r["kind"] == "step"]
    assert len(losses) == 3 and all(len(row) == 4 and all(math.isfinite(v) and v > 0 for v in row) for row in losses)
    if objective == "classify":
        assert all(v == pytest.approx(math.log(10), rel=0.3) for v in losses[0])  # 10 classes, near chance
    train(tiny(tmp_path / "b", f"model.objective={objective!r}", "model.boundary='isolated'", "train.max_steps=3"))
    again = [json.loads(line)["loss_stage"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "step"]
    assert again == losses


@pytest.mark.slow
def test_a_resumed_mixed_objective_run_gives_the_uninterrupted_losses(tmp_path):
    """Labels and two augmented views (real Fashion-MNIST crops and flips) keep resume exact: a run
    stopped mid-epoch twice logs the uninterrupted run's losses, bit for bit, and ends at its weights."""
    from isolocal.io.checkpoint import LAST, load_state

    opts = ["data.name='fashion_mnist'", "data.train_subset=64", "train.batch_size=16", "train.accum_steps=2",
            "train.epochs=2", "model.boundary='isolated'", "model.objective=['mim', 'contrastive', 'mim', 'classify']"]
    train(tiny(tmp_path / "whole", *opts))
    train(tiny(tmp_path / "parts", *opts, "train.max_steps=3"))
    train(tiny(tmp_path / "parts", *opts, "train.max_steps=6"), resume=True)
    train(tiny(tmp_path / "parts", *opts), resume=True)
    whole, parts = ([json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
                    for run in ("whole", "parts"))
    assert [r["loss_stage"] for r in whole if r["kind"] == "step"] == [r["loss_stage"] for r in parts if r["kind"] == "step"]
    assert len([r for r in whole if r["kind"] == "step"]) == 8
    a, b = (load_state(tmp_path / run / LAST)["model"] for run in ("whole", "parts"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_cli_trains_a_classify_model_on_fashion_mnist(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", "--set", "preset=localmim_vit_nano", 'model.objective="classify"',
                 "model.boundary='isolated'", "data.train_subset=64", "train.batch_size=16", "train.max_steps=2",
                 f"out_dir={str(out)!r}"]) == 0
    assert "isolated run: 2 steps" in capsys.readouterr().out
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(steps[0]["loss_stage"]) == 4


# ---------------------------------------------------------------------------------------- validation

def test_bad_objectives_are_refused_naming_the_value_and_the_valid_heads(tmp_path):
    with pytest.raises(ValueError, match=r"model.objective 'supervised' is not a head; valid heads: auglocal, "
                                         r"classify, contrastive, dgl, infopro, man, mim"):
        isolocal.create_model(NANO, objective="supervised")
    with pytest.raises(ValueError, match=r"model.objective must have one entry per stage \(4\), got 2"):
        isolocal.create_model(NANO, objective=["mim", "classify"])
    out = tmp_path / "never"
    with pytest.raises(ValueError, match="is not a head"):
        train(tiny(out, "model.objective='byol'"))
    assert not out.exists()
    for override, message in (("model.temperature=0", "model.temperature must be > 0"),
                              ("model.num_classes=1", "model.num_classes must be >= 2")):
        with pytest.raises(ValueError, match=message):
            load_run_config(None, [*TINY, override])


def _one_class_folder(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(root / "images" / f"{i}.png")
    return root


def test_classify_on_an_unlabelled_folder_fails_in_one_line_before_work(tmp_path, capsys):
    root = _one_class_folder(tmp_path / "folder")
    out = tmp_path / "never"
    args = ["pretrain", "--set", "data.name=folder", f"data.root={str(root)!r}", 'model.objective="classify"',
            "train.batch_size=2", f"out_dir={str(out)!r}"]
    assert main(args) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.objective 'classify' needs labels" in err and "unlabelled" in err
    assert not out.exists()
    # mim and contrastive need no labels: the same folder starts training
    train(tiny(tmp_path / "mim", "data.name='folder'", f"data.root={str(root)!r}", "train.batch_size=2",
               "train.max_steps=1", "model.objective=['mim', 'mim', 'mim', 'contrastive']"))
    with pytest.raises(ValueError, match=r"model.num_classes \(3\) is smaller than the 10 classes"):
        train(tiny(tmp_path / "few", "model.objective='classify'", "model.num_classes=3"))


def test_a_forward_without_the_labels_a_head_needs_is_refused():
    model = isolocal.create_model(NANO, objective=["mim", "mim", "mim", "classify"])
    images, mask, labels = inputs(model, 2)
    with pytest.raises(ValueError, match="the classify head needs labels"):
        model(images, mask)
    with pytest.raises(ValueError, match=r"labels must have one entry per sample \(2\), got 3"):
        model(images, mask, labels=torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="labels must be a 1-D integer tensor"):
        model(images, mask, labels=labels.float())


# ---------------------------------------------------------------------------------------- analysis

def test_attention_analysis_and_maps_work_on_a_classify_model(tmp_path):
    """NMI, attention distance and attention maps of a classify-head model, through the CLI, equal the
    direct computation; reconstructions of a mixed model show its MIM stages only."""
    from analysis.capture import capture_attention
    from analysis.loading import load_images
    from analysis.metrics import layer_table
    from analysis.reconstruction import reconstruct

    model = isolocal.create_model(NANO, objective="classify")
    images, mask, labels = inputs(model, 8)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(3):
        opt.zero_grad()
        model(images, mask, labels=labels).loss.backward()
        opt.step()
    model.eval()
    ckpt = tmp_path / "classify.pt"
    torch.save({"model": model.state_dict(), "config": to_dict(RunConfig(model=model.cfg)), "step": 3}, ckpt)
    out = tmp_path / "out"
    for what in ("nmi", "distance", "attention"):
        assert main(["analyze", what, "--ckpt", str(ckpt), "--images", "fmnist:0,5", "--out", str(out)]) == 0
    direct = layer_table(capture_attention(model, load_images("fmnist:0,5", 32, 1).images), (8, 8), (4, 4))
    np.testing.assert_allclose(pd.read_csv(out / "nmi.csv")["classify"], direct["nmi"], rtol=1e-9)
    np.testing.assert_allclose(pd.read_csv(out / "distance.csv")["classify"], direct["attention_distance"], rtol=1e-9)
    assert (out / "attention_classify_fmnist_0.png").exists()
    mixed = isolocal.create_model(NANO, objective=["mim", "classify", "mim", "contrastive"])
    recs = reconstruct(mixed, images[:2], mask[:2])
    assert [r.stage for r in recs] == [0, 2]


# ---------------------------------------------------------------------------------------- data parallel

DDP_SCRIPT = """
import sys, torch
from isolocal.config.load import load_run_config
from isolocal.train import Trainer
cfg = load_run_config(None, sys.argv[2:])
cfg.out_dir = sys.argv[1]
trainer = Trainer(cfg)
try:
    trainer.fit()
    torch.save(trainer.model.state_dict(), f"{sys.argv[1]}/rank{trainer.dist.rank}.pt")
finally:
    trainer.close()
"""


@pytest.mark.slow
def test_labels_and_views_flow_through_two_process_data_parallel(tmp_path):
    """torchrun, 2 gloo processes, isolated, a mixed MIM / classify / contrastive model: each rank reads
    its own labels and views, and both ranks end with the same parameters, which moved."""
    overrides = [*TINY, "model.boundary='isolated'", "model.objective=['mim', 'mim', 'classify', 'contrastive']",
                 "train.max_steps=3"]
    torchrun_two(DDP_SCRIPT, tmp_path, overrides)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    torch.manual_seed(0)
    init = isolocal.StagewiseEncoder(load_run_config(None, overrides).model).state_dict()
    for key in r0:
        assert torch.equal(r0[key], r1[key]), key
    for k in range(4):
        assert any(not torch.equal(init[key], r0[key]) for key in r0 if key.startswith(f"stages.{k}.blocks."))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "step"] == [0, 1, 2]


def test_a_registered_head_plugs_into_any_stage():
    """A user's head (`register_head`): built for its stages, trained in a mixed model, isolated; with
    no head needing the mask the encoder reads every token (the CLS plus all 64)."""
    class Energy(StageHead):
        needs = frozenset()

        def __init__(self, dim: int):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(dim))

        def loss(self, features: torch.Tensor, inputs: HeadInputs) -> HeadOutput:
            return HeadOutput((pool(features, inputs.prefix) * self.scale).pow(2).mean(), features)

    register_head("energy", Energy.needs, lambda cfg, dim: Energy(dim))
    try:
        model = isolocal.create_model(NANO, boundary="isolated", objective=["energy", "energy", "classify", "energy"])
        images, mask, labels = inputs(model, 2)
        out = model(images, mask, return_pred=True, labels=labels)
        assert out.preds[0].shape == (2, 65, 64) and isinstance(model.stages[0].head, Energy)
        below = [p for p in model.stages[0].parameters() if p.requires_grad]
        assert all(g is None for g in torch.autograd.grad(out.losses[1], below, allow_unused=True))
        with pytest.raises(ValueError, match=r"head 'bad' needs \['depth'\], which no runner provides"):
            register_head("bad", frozenset({"depth"}), lambda cfg, dim: Energy(dim))
    finally:
        HEADS.pop("energy")


# ---------------------------------------------------------------------------------------- other families, studies

def test_swin_stages_take_classify_and_contrastive_heads_in_isolation():
    """Swin tokens have no CLS (prefix 0): mixed heads train, and isolation holds as for the ViT."""
    model = isolocal.create_model("localmim_swin_nano", boundary="isolated",
                                  objective=["mim", "classify", "mim", "contrastive"])
    images, mask, labels = inputs(model, 2)
    out = model(images, mask, labels=labels)
    assert all(torch.isfinite(loss) for loss in out.losses)
    below = [p for s in model.stages[:3] for p in s.parameters() if p.requires_grad]
    assert all(g is None for g in torch.autograd.grad(out.losses[3], below, allow_unused=True))


STUDY = """
[study]
name = "objectives"
out_dir = "{out}"
seeds = [0, 1]

[base]
preset = "localmim_vit_nano"

[variants.mim_isolated.model]
boundary = "isolated"

[variants.mixed_isolated.model]
boundary = "isolated"
objective = ["mim", "mim", "mim", "classify"]

[variants.supervised]
model = {{ taps = [3], scales = [1.0], objective = "classify" }}
"""


def test_studies_vary_the_objective_and_report_which_heads_trained_which_stages(tmp_path):
    from isolocal.study.report import heads_per_stage
    from isolocal.study.schema import load_study

    path = tmp_path / "study.toml"
    path.write_text(STUDY.format(out=tmp_path / "out"))
    study = load_study(path)
    assert [heads_per_stage(study, v) for v in study.variants] == [
        "mim (stages 0, 1, 2, 3); boundary 'isolated'",
        "mim (stages 0, 1, 2); classify (stage 3); boundary 'isolated'",
        "classify (stage 0); boundary 'global'"]
    path.write_text(STUDY.format(out=tmp_path / "out").replace('"classify" }', '"byol" }'))
    with pytest.raises(ValueError, match="variant supervised: model.objective 'byol' is not a head"):
        load_study(path)


# ---------------------------------------------------------------------------------------- pipeline

@pytest.mark.slow
def test_a_mixed_objective_pipeline_gives_the_single_process_parameters(tmp_path):
    """2 pipeline ranks (stages 0-1 | 2-3) of a mim / classify / mim / contrastive model, isolated and
    global: labels and both views reach every rank's heads, and after 3 steps the parameters and every
    logged loss equal the single-process trainer's (same data, labels, views and masks) to 1e-5."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_pipeline import assert_pipeline_equals_single_process

    assert_pipeline_equals_single_process(tmp_path, [
        *TINY, "data.synthetic_size=64", "train.batch_size=16", "train.max_steps=3", "train.base_lr=0.01",
        "pipeline.micro_batches=2", "pipeline.timeout_s=60", "model.objective=['mim', 'classify', 'mim', 'contrastive']"])
