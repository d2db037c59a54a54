"""Evaluation: k-NN, per-stage linear probes, fine-tuning with layer decay, and the `isolocal eval` CLI."""
from __future__ import annotations

import copy
import dataclasses
import json
import os

import pytest
import torch

import isolocal
from isolocal.cli import main
from isolocal.config import ConfigError, EvalConfig
from isolocal.config.load import load_run_config
from isolocal.data import FASHION_MNIST_ROOT, SyntheticImages
from isolocal.eval import (build_classifier, classifier_accuracy, extract_features, finetune, finetune_optimizer,
                           fit_linear_probe, knn_accuracy, knn_predict, linear_per_stage, online_knn, probe_top1,
                           split_features)
from isolocal.eval.finetune import finetune_criterion
from isolocal.eval.linear import cosine_scheduler
from isolocal.io.load import load_model
from isolocal.train import Trainer


def _clusters(n: int, noise: float = 0.1, seed: int = 0, num_classes: int = 10, dim: int = 32):
    """Features around one fixed random unit centre per class (noise drawn from `seed`)."""
    centres = torch.nn.functional.normalize(torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(0)), dim=1)
    labels = torch.arange(n) % num_classes
    return centres[labels] + noise * torch.randn(n, dim, generator=torch.Generator().manual_seed(seed + 1)), labels


def _nano() -> isolocal.StagewiseEncoder:
    torch.manual_seed(0)
    return isolocal.create_model("localmim_vit_nano")


def test_knn_separable_features_are_classified_perfectly():
    train_x, train_y = _clusters(1000, seed=0)
    test_x, test_y = _clusters(500, seed=1)
    assert knn_accuracy(train_x, train_y, test_x, test_y, num_classes=10) > 99.0


def test_knn_shuffled_labels_are_near_chance():
    train_x, train_y = _clusters(2000, seed=0)
    test_x, test_y = _clusters(2000, seed=1)
    shuffled = train_y[torch.randperm(len(train_y), generator=torch.Generator().manual_seed(3))]
    acc = knn_accuracy(train_x, shuffled, test_x, test_y, num_classes=10)
    assert abs(acc - 10.0) < 4.0, acc


def test_knn_votes_are_weighted_by_exp_similarity():
    # Two neighbours of class 0 at similarity 0.5, one of class 1 at similarity ~1.
    train = torch.tensor([[1.0, 0.0], [0.5, 0.75 ** 0.5], [0.5, -(0.75 ** 0.5)]])
    labels = torch.tensor([1, 0, 0])
    query = torch.tensor([[1.0, 0.0]])
    # DINO's T = 0.07: exp(1/T) outweighs 2 exp(0.5/T); a near-uniform weighting is a majority vote.
    assert knn_predict(train, labels, query, num_classes=2, k=3, t=0.07).item() == 1
    assert knn_predict(train, labels, query, num_classes=2, k=3, t=100.0).item() == 0
    with pytest.raises(ValueError, match="k must be in"):
        knn_predict(train, labels, query, num_classes=2, k=4)


def test_features_match_encode_and_restore_train_mode():
    model = _nano().train()
    data = SyntheticImages(12, 32, in_chans=1)
    images = torch.stack([data[i][0] for i in range(12)])
    for feature, pool in (("cls", lambda t: t[:, 0]), ("mean", lambda t: t[:, 1:].mean(1))):
        feats, labels = extract_features(model, data, feature=feature, batch_size=5, progress=False)
        assert model.training
        model.eval()
        with torch.no_grad():
            expected = [pool(t) for t in model.encode(images)]
        model.train()
        assert len(feats) == model.num_stages
        for f, e in zip(feats, expected):
            assert f.shape == (12, 64)
            torch.testing.assert_close(f, e, rtol=1e-5, atol=1e-5)
        assert labels.tolist() == data.targets


def test_linear_probe_learns_separable_features():
    train_x, train_y = _clusters(1000, noise=0.2, seed=0)
    test_x, test_y = _clusters(500, noise=0.2, seed=1)
    val_x, val_y = _clusters(200, noise=0.2, seed=2)
    cfg = EvalConfig(linear_epochs=5, linear_batch_size=100)
    fitted = fit_linear_probe(train_x, train_y, val_x, val_y, cfg, progress=False)
    assert fitted.val_top1 > 99.0 and probe_top1(fitted.probe, test_x, test_y) > 99.0
    shuffled = fit_linear_probe(train_x, train_y[torch.randperm(1000)], val_x, val_y, cfg, progress=False)
    assert probe_top1(shuffled.probe, test_x, test_y) < 25.0


def test_linear_probe_keeps_its_best_validation_epoch():
    """The probe is scored on validation after every epoch and comes back as it was at the best one:
    its validation top-1 is the maximum over epochs, and rescoring the returned probe reproduces it."""
    train_x, train_y = _clusters(400, noise=1.2, seed=0)
    val_x, val_y = _clusters(200, noise=1.2, seed=2)
    cfg = EvalConfig(linear_epochs=6, linear_batch_size=50, linear_lr=0.5)
    fitted = fit_linear_probe(train_x, train_y, val_x, val_y, cfg, progress=False)
    history = fitted.val_history
    assert len(history) == 6 and len(set(history)) > 1  # noisy clusters: validation top-1 moves between epochs
    assert fitted.val_top1 == max(history) and fitted.epoch == history.index(max(history))
    assert probe_top1(fitted.probe, val_x, val_y) == fitted.val_top1


def test_linear_probe_leaves_encoder_bit_identical():
    model = _nano()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads_before = {n: p.requires_grad for n, p in model.named_parameters()}
    data = SyntheticImages(64, 32, in_chans=1)
    cfg = EvalConfig(linear_epochs=10, linear_batch_size=16, feature="mean")
    train = split_features(model, data, cfg, progress=False)
    val = split_features(model, SyntheticImages(32, 32, in_chans=1, train=False), cfg, progress=False)
    accs = [fitted.val_top1 for fitted in linear_per_stage(train, val, cfg, progress=False)]
    # The 10 grating classes are separable even in random-init features: 10 epochs on 64 images beat
    # chance (10 %) by more than 40 points on every stage.
    assert len(accs) == model.num_stages and all(a > 50.0 for a in accs), accs
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())
    assert grads_before == {n: p.requires_grad for n, p in model.named_parameters()}


def test_finetune_layer_decay_scales_first_and_last_block():
    model = _nano()
    cfg = EvalConfig(layer_decay=0.5, finetune_lr=1e-3)
    clf = build_classifier(model, cfg)
    opt = finetune_optimizer(clf, cfg)
    names = {id(p): n for n, p in clf.named_parameters()}
    scale = {names[id(p)]: g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    depth = model.cfg.depth  # timm layers: stem 0, blocks 1..depth, head depth + 1
    assert scale["blocks.0.attn.qkv.weight"] == pytest.approx(0.5 ** depth)
    assert scale[f"blocks.{depth - 1}.mlp.fc2.weight"] == pytest.approx(0.5)
    assert scale["head.weight"] == 1.0
    assert scale["patch_embed.proj.weight"] == pytest.approx(0.5 ** (depth + 1))
    # The scheduler applies the scale to the group's lr (timm's optimizer alone does not).
    sched = cosine_scheduler(opt, epochs=2, steps_per_epoch=5, warmup_epochs=0)
    sched.step_update(0)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(1e-3 * g["lr_scale"])


def test_classifier_pools_the_last_stage_mean_feature():
    model = _nano().eval()
    images = torch.randn(3, 1, 32, 32)
    for source in (model, isolocal.create_timm_model(model)):  # a StagewiseEncoder or its timm export
        clf = build_classifier(source, EvalConfig(num_classes=7)).eval()
        with torch.no_grad():
            pooled = clf.forward_head(clf.forward_features(images), pre_logits=True)
            assert clf(images).shape == (3, 7)
            torch.testing.assert_close(pooled, model.encode(images)[-1][:, 1:].mean(1), rtol=1e-5, atol=1e-5)


def test_finetune_criterion_follows_config():
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    assert isinstance(finetune_criterion(EvalConfig(label_smoothing=0.1))[0], LabelSmoothingCrossEntropy)
    loss, mixup = finetune_criterion(EvalConfig(mixup=0.8, cutmix=1.0))
    assert isinstance(loss, SoftTargetCrossEntropy) and mixup is not None
    assert isinstance(finetune_criterion(EvalConfig(label_smoothing=0.0))[0], torch.nn.CrossEntropyLoss)


def test_finetune_runs_with_mixup_and_leaves_source_model_unchanged():
    model = _nano()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = EvalConfig(finetune_epochs=1, finetune_batch_size=16, mixup=0.8, cutmix=1.0, drop_path=0.1)
    out = finetune(model, SyntheticImages(48, 32, in_chans=1), SyntheticImages(20, 32, in_chans=1, train=False),
                   cfg, progress=False)
    assert len(out.epochs) == 1
    assert torch.isfinite(torch.tensor(out.epochs[0]["train_loss"]))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_finetune_learns_the_synthetic_classes():
    """Two epochs on 96 grating images (no mixup): top-1 on 50 held-out images beats chance (10 %) by
    more than 20 points."""
    cfg = EvalConfig(finetune_epochs=2, finetune_batch_size=16)
    held_out = SyntheticImages(50, 32, in_chans=1, train=False)
    out = finetune(_nano(), SyntheticImages(96, 32, in_chans=1), held_out, cfg, progress=False)
    assert out.val_top1 > 30.0, out.val_top1
    assert out.epochs[-1]["train_loss"] < out.epochs[0]["train_loss"]
    # the classifier comes back at its best validation epoch: rescoring it gives that epoch's number
    assert out.val_top1 == max(e["val_top1"] for e in out.epochs) == out.epochs[out.epoch]["val_top1"]
    assert classifier_accuracy(out.classifier, held_out, progress=False) == out.val_top1


def test_finetune_stops_after_patience_epochs_without_a_better_validation_top1():
    cfg = EvalConfig(finetune_epochs=6, finetune_batch_size=16, finetune_patience=1, finetune_lr=1e-6)
    out = finetune(_nano(), SyntheticImages(32, 32, in_chans=1), SyntheticImages(20, 32, in_chans=1, train=False),
                   cfg, progress=False)
    # an lr of 1e-6 barely moves the classifier: its validation top-1 stops improving within a few epochs,
    # and the run ends one epoch after its best
    assert len(out.epochs) == out.epoch + 2 < 6


def test_online_knn_reports_every_stage():
    model = _nano()
    cfg = EvalConfig(knn_k=5, feature="mean")
    out = online_knn(model, SyntheticImages(60, 32, in_chans=1), SyntheticImages(20, 32, in_chans=1, train=False), cfg)
    assert sorted(out) == [f"knn_val_top1_stage{k}" for k in range(model.num_stages)]
    assert all(acc > 50.0 for acc in out.values()), out  # chance is 10 %


def test_eval_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="eval.knn_t"):
        load_run_config(None, ["eval.knn_t=0"])
    with pytest.raises(ConfigError, match="eval.layer_decay"):
        load_run_config(None, ["eval.layer_decay=1.5"])


def test_cli_rejects_bad_input_before_work(tmp_path, capsys):
    assert main(["eval", "knn", "--ckpt", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt does not exist" in capsys.readouterr().err
    assert main(["eval", "linear", "--ckpt", "random", "--set", "eval.linear_optimizer=sgdd"]) == 2
    err = capsys.readouterr().err
    assert "'sgdd'" in err and "adamw" in err
    assert main(["eval", "finetune", "knn", "--ckpt", "random"]) == 2
    assert "finetune alone" in capsys.readouterr().err


def test_random_is_the_init_pre_training_of_the_same_seed_starts_from(tmp_path):
    """`--ckpt random` (a study's control) evaluates exactly the weights a run of that seed starts from."""
    sets = ["data.name='synthetic'", "data.synthetic_size=64", "train.batch_size=32"]
    cfg = load_run_config(None, sets + ["train.seed=7", f"out_dir='{tmp_path / 'run'}'"])
    start = Trainer(cfg).model.state_dict()
    random = load_model("random", cfg).state_dict()
    assert random.keys() == start.keys() and all(torch.equal(v, start[k]) for k, v in random.items())
    other = load_model("random", load_run_config(None, sets + ["train.seed=8"])).state_dict()
    assert not all(torch.equal(v, other[k]) for k, v in random.items())
    with pytest.raises(ValueError, match="'random' is a run config's model at its seeded init: pass the config"):
        load_model("random")


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_ROOT), reason="Fashion-MNIST is not installed")
def test_cli_fashion_mnist_random_init(tmp_path, capsys):
    out = tmp_path / "results.json"
    rc = main(["eval", "knn", "linear", "--ckpt", "random", "--set", "eval.train_subset=1000",
               "--set", "eval.test_subset=300", "--set", "eval.linear_epochs=30", "--out", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    # 10 % of the 1,000 labelled images held out for validation; the probes train on the other 900
    assert (result["train_images"], result["val_images"], result["test_images"]) == (900, 100, 300)
    assert result["reads"] == ["val", "test"]
    assert [row["stage"] for row in result["results"]] == [0, 1, 2, 3]
    printed = capsys.readouterr().out
    for mode in ("knn", "linear"):
        accs = [row[f"{mode}_top1"] for row in result["results"]]
        assert all(a > 40.0 for a in accs), (mode, accs)  # random-init features already beat chance (10%) by far
        assert f"{mode}_top1" in printed


def test_cli_finetune_synthetic(tmp_path):
    out = tmp_path / "ft.json"
    rc = main(["eval", "finetune", "--ckpt", "random", "--set", "data.name='synthetic'", "--set",
               "data.synthetic_size=64", "--set", "eval.finetune_epochs=1", "--set", "eval.finetune_batch_size=32",
               "--out", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["results"][0]["stages"] == "0-3" and len(result["epochs"]) == 1


def test_cli_evaluates_a_pretrained_checkpoint(tmp_path):
    from isolocal.train import train

    sets = ["data.name='synthetic'", "data.synthetic_size=64", "train.batch_size=32", "train.max_steps=1"]
    cfg = load_run_config(None, sets + ["model.boundary='isolated'", f"out_dir='{tmp_path / 'run'}'"])
    train(cfg)
    out = tmp_path / "eval.json"
    rc = main(["eval", "knn", "--ckpt", str(tmp_path / "run" / "last.pt"), "--set", "eval.knn_k=5", "--out", str(out)]
              + [arg for s in sets for arg in ("--set", s)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["model"]["boundary"] == "isolated"  # the checkpoint's model, not the eval config's
    accs = [row["knn_top1"] for row in result["results"]]
    assert len(accs) == 4 and all(a > 40.0 for a in accs), accs  # gratings: chance is 10 %


# ---------------------------------------------------------------------------------------- the model's own classifiers

def test_head_accuracy_is_each_classify_heads_argmax_agreement_with_the_labels():
    """Only classify stages are scored, on full images, each by its own head: a hand count of
    argmax(head(pool(encode))) == label over the set, in eval mode (restored afterwards)."""
    from isolocal.eval.head_accuracy import head_accuracy

    torch.manual_seed(0)
    model = isolocal.create_model("localmim_vit_nano", objective=["mim", "classify", "contrastive", "classify"],
                                  drop_path_rate=0.1).train()
    data = SyntheticImages(40, 32, 1, seed=3)
    accs = head_accuracy(model, data, batch_size=16, progress=False)
    assert sorted(accs) == [1, 3] and model.training
    images = torch.stack([data[i][0] for i in range(len(data))])
    labels = torch.tensor([data[i][1] for i in range(len(data))])
    model.eval()
    with torch.no_grad():
        feats = model.encode(images)
        for k in (1, 3):
            logits = model.stages[k].head.mlp(feats[k][:, 1:].mean(1))
            assert accs[k] == pytest.approx(100.0 * (logits.argmax(1) == labels).float().mean().item())
    assert head_accuracy(_nano(), data, progress=False) == {}  # mim everywhere: nothing to score


def test_head_accuracy_scores_in_eval_mode_and_changes_no_weight_or_statistic(capsys):
    """A ResNet's BatchNorm tells the modes apart: labelled with its own eval-mode predictions, each head
    scores 100 %, and the running statistics are untouched. A progress bar is drawn unless asked not to."""
    from isolocal.eval.head_accuracy import head_accuracy
    from isolocal.models.encoder import StagewiseEncoder

    torch.manual_seed(0)
    cfg = dataclasses.replace(isolocal.preset_config("resnet32_k4"), depths=[1, 1, 2], taps=[1, 3], img_size=16)
    model = StagewiseEncoder(cfg).train()
    images = torch.randn(24, 1, 16, 16) * 3 + 1  # far from the initial running mean 0 and variance 1
    with torch.no_grad():
        model.eval()
        feats = model.encode(images)
        predicted = [model.stages[k].head.logits(feats[k], 0).argmax(1) for k in (0, 1)]
        model.train()
    before = copy.deepcopy(model.state_dict())
    for k in (0, 1):
        data = list(zip(images, predicted[k].tolist()))
        assert head_accuracy(model, data, batch_size=8, progress=False)[k] == 100.0
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items()) and model.training
    assert capsys.readouterr().err == ""
    head_accuracy(model, data[:8])
    assert "classify heads: " in capsys.readouterr().err  # tqdm's "{desc}: {percentage}"


def test_eval_head_reports_only_the_classify_stages(tmp_path):
    from isolocal.train import train

    sets = ["data.name='synthetic'", "data.synthetic_size=64", "train.batch_size=32", "train.max_steps=2",
            "model.objective=['mim', 'classify', 'mim', 'classify']"]
    train(load_run_config(None, sets + [f"out_dir='{tmp_path / 'run'}'"]))
    out = tmp_path / "eval.json"
    rc = main(["eval", "head", "--ckpt", str(tmp_path / "run"), "--out", str(out)]
              + [arg for s in sets for arg in ("--set", s)])
    assert rc == 0
    rows = json.loads(out.read_text())["results"]
    assert ["head_top1" in row for row in rows] == [False, True, False, True]
    assert all(0.0 <= row["head_top1"] <= 100.0 for row in rows if "head_top1" in row)


def test_study_summaries_carry_each_classify_heads_accuracy_and_the_top_one(tmp_path):
    """A study run's probes.json -> `head` per classify stage (by tap layer) and `head_top` only when the
    top stage classifies (its head is the model's prediction)."""
    from pathlib import Path

    from isolocal.study.summary import run_rows
    from isolocal.study.schema import Run

    def rows_of(head: dict[int, float]) -> list[dict]:
        run = Run("v", 0, Path(tmp_path / f"run{len(head)}{sorted(head)}"))
        run.dir.mkdir()
        (run.dir / "run.json").write_text(json.dumps({"config": {"model": {"taps": [1, 3, 5, 7]}}}))
        results = [{"stage": k, "tap": t, "knn_val": 50.0, "knn_top1": 50.0 + k,
                    **({"head_top1": head[k], "head_val": head[k]} if k in head else {})}
                   for k, t in enumerate([1, 3, 5, 7])]
        (run.dir / "probes.json").write_text(json.dumps({"results": results, "selected": {"knn": 0}}))
        (run.dir / "analysis.csv").write_text("layer,nmi,attention_distance\n1,0.1,2.0\n")
        return [r for r in run_rows(run) if r["metric"] in ("head", "head_top")]

    rows = rows_of({1: 61.0, 3: 72.5})
    assert [(r["metric"], r["stage"], r["layer"], r["value"]) for r in rows] == [
        ("head", 1, 4, 61.0), ("head", 3, 8, 72.5), ("head_top", None, None, 72.5)]
    assert [r["metric"] for r in rows_of({0: 40.0})] == ["head"]  # a lower classifier is not the model's prediction
    assert rows_of({}) == []


def test_study_summaries_quote_the_stage_chosen_on_validation_never_a_test_maximum(tmp_path):
    from pathlib import Path

    from isolocal.study.schema import Run
    from isolocal.study.summary import run_rows

    run = Run("v", 0, Path(tmp_path))
    (run.dir / "run.json").write_text(json.dumps({"config": {"model": {"taps": [1, 3, 5, 7]}}}))
    test, val = [60.0, 80.0, 70.0, 65.0], [75.0, 70.0, 76.0, 71.0]  # test is best at stage 1, validation at 2
    results = [{"stage": k, "tap": t, "linear_val": val[k], "linear_top1": test[k], "linear_epoch": 3}
               for k, t in enumerate([1, 3, 5, 7])]
    (run.dir / "probes.json").write_text(json.dumps({"results": results, "selected": {"linear": 2}}))
    (run.dir / "analysis.csv").write_text("layer,nmi,attention_distance\n")
    rows = {(r["metric"], r["stage"]): r["value"] for r in run_rows(run)}
    assert rows[("linear_sel", None)] == 70.0 and rows[("linear_sel_stage", None)] == 2
    assert rows[("linear_top", None)] == 65.0
    assert [rows[("linear", k)] for k in range(4)] == test and [rows[("linear_val", k)] for k in range(4)] == val
    assert 80.0 not in {v for (m, _), v in rows.items() if m != "linear"}  # no metric is the test maximum
