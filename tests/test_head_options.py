"""Head options (`[model.head_options.<head>]`): a head's own settings as a registered dataclass, checked like
every config key before any work, applied to every stage of that head; the shipped heads' 0.2 flat keys
(`model.proj_dim`, ...) still work and give the same config; errors name a value as it was given."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

import isolocal
from isolocal.config import ConfigError, ModelConfig, from_dict, to_dict
from isolocal.config.head_options import OPTIONS
from isolocal.config.load import load_run_config
from isolocal.config.toml import dumps_toml
from isolocal.heads import (HEADS, ContrastiveOptions, HeadInputs, HeadOutput, StageHead, StagePlan, option, pool,
                            register_head)
from isolocal.train.loop import check_resume

NANO = "localmim_vit_nano"


pytestmark = pytest.mark.usefixtures("own_head_registry")  # tests register heads of their own


@dataclass
class ScaleOptions:
    width: int = option(4, at_least=1)
    weight: float = option(1.0, above=0)
    kind: str = option("l2", one_of=("l1", "l2"))
    taps: list[int] = field(default_factory=list)

    def __post_init__(self):
        if self.kind == "l1" and self.weight > 10:
            raise ValueError("an l1 weight above 10 diverges")


class ScaleHead(StageHead):
    def __init__(self, dim: int, options: ScaleOptions):
        super().__init__()
        self.proj = nn.Linear(dim, options.width)
        self.options = options

    def loss(self, features: torch.Tensor, inputs: HeadInputs) -> HeadOutput:
        z = self.proj(pool(features, inputs.prefix))
        return HeadOutput(self.options.weight * z.pow(2).mean(), z)


def register_scale() -> list:
    """Register head 'scale' with options; returns the (cfg, dim, options) of every build call."""
    calls = []

    def build(cfg: ModelConfig, dim: int, options: ScaleOptions) -> ScaleHead:
        calls.append((cfg, dim, options))
        return ScaleHead(dim, options)

    register_head("scale", set(), build, options=ScaleOptions)
    return calls


def model_config(**fields) -> ModelConfig:
    return from_dict(ModelConfig, {**to_dict(isolocal.preset_config(NANO)), **fields}, prefix="model.")


# ---------------------------------------------------------------------------------------- a head's own options

def test_build_receives_the_tables_options_for_every_stage_of_its_head():
    calls = register_scale()
    model = isolocal.create_model(NANO, objective=["scale", "mim", "scale", "contrastive"],
                                  head_options={"scale": {"width": 3, "kind": "l1"}, "contrastive": {"proj_dim": 8}})
    assert [(dim, options) for _, dim, options in calls] == [(64, ScaleOptions(3, 1.0, "l1"))] * 2
    assert [model.stages[k].head.proj.out_features for k in (0, 2)] == [3, 3]
    assert model.stages[3].head.proj[2].out_features == 8
    assert model.plan.options == (ScaleOptions(3, 1.0, "l1"), None, ScaleOptions(3, 1.0, "l1"),
                                  ContrastiveOptions(proj_dim=8))


def test_defaults_apply_without_a_table_and_a_head_without_options_gets_cfg_and_dim():
    calls = register_scale()
    register_head("plain", set(), lambda cfg, dim: ScaleHead(dim, ScaleOptions(width=dim)))
    model = isolocal.create_model(NANO, objective=["scale", "plain", "mim", "mim"])
    assert calls[0][2] == ScaleOptions() and model.stages[1].head.proj.out_features == 64


@pytest.mark.parametrize("table, message", [
    ({"widht": 3}, r"unknown option model.head_options.scale.widht; the options of head 'scale' are width, weight, "
                   r"kind, taps"),
    ({"width": "3"}, r"model.head_options.scale.width: '3' has the wrong type; expected int"),
    ({"width": 2.5}, r"model.head_options.scale.width: 2.5 has the wrong type; expected int"),
    ({"taps": [1, "x"]}, r"model.head_options.scale.taps\[1\]: 'x' has the wrong type; expected int"),
    ({"width": 0}, r"model.head_options.scale.width must be >= 1, got 0"),
    ({"weight": 0}, r"model.head_options.scale.weight must be > 0, got 0.0"),
    ({"kind": "l3"}, r"model.head_options.scale.kind must be one of 'l1', 'l2'; got 'l3'"),
    ({"kind": "l1", "weight": 11}, r"model.head_options.scale: an l1 weight above 10 diverges"),
])
def test_bad_options_are_refused_before_any_weights_naming_the_key(table, message, monkeypatch):
    register_scale()
    monkeypatch.setattr(isolocal.models.vit, "PatchEmbed", lambda *a, **k: pytest.fail("weights were built"))
    with pytest.raises(ConfigError, match=message):
        isolocal.create_model(NANO, objective="scale", head_options={"scale": table})
    with pytest.raises(ConfigError, match=message):  # the run config, before the model: at load
        load_run_config(None, ["model.objective='scale'", *(f"model.head_options.scale.{k}={v!r}".replace("'", '"')
                                                            for k, v in table.items())])


def test_tables_name_registered_heads_that_take_options():
    with pytest.raises(ConfigError, match=r"model.head_options.vicrge: no head 'vicrge' is registered; valid heads: "
                                          r"auglocal, classify, contrastive, dgl, infopro, man, mim; a head of your "
                                          r"own: import its module"):
        isolocal.create_model(NANO, head_options={"vicrge": {"x": 1}})
    with pytest.raises(ConfigError, match=r"model.head_options.mim: head 'mim' takes no options, got ratio; remove "
                                          r"the table"):
        isolocal.create_model(NANO, head_options={"mim": {"ratio": 1}})
    with pytest.raises(ConfigError, match=r"model.head_options.classify: 3 has the wrong type; expected a table"):
        load_run_config(None, ["model.head_options.classify=3"])
    # A table of a head no stage trains is checked, and accepted (a study's base may set it for its variants).
    with pytest.raises(ConfigError, match="model.head_options.classify.num_classes must be >= 2, got 1"):
        isolocal.create_model(NANO, head_options={"classify": {"num_classes": 1}})
    isolocal.create_model(NANO, head_options={"classify": {"num_classes": 3}})
    # A model loaded for its encoder leaves the tables of heads it does not know alone.
    plan = StagePlan.from_config(model_config(objective="gone", head_options={"gone": {"x": 1}}), skip_missing=True)
    assert plan.skipped == (0, 1, 2, 3) and plan.options == (None,) * 4


def test_options_must_be_a_dataclass_with_defaults_and_build_must_take_them():
    @dataclass
    class NoDefault:
        width: int

    with pytest.raises(ValueError, match=r"head 'bad': every option needs a default, as a config may set none; "
                                         r"width of NoDefault have none"):
        register_head("bad", set(), lambda cfg, dim, options: None, options=NoDefault)
    with pytest.raises(ValueError, match=r"head 'bad': options must be a dataclass \(the class itself\)"):
        register_head("bad", set(), lambda cfg, dim, options: None, options=ScaleOptions())
    with pytest.raises(ValueError, match=r"head 'bad': build\(cfg, dim\) cannot be called as build\(cfg, dim, "
                                         r"options\); a head registered with options gets them as a third argument"):
        register_head("bad", set(), lambda cfg, dim: None, options=ScaleOptions)
    with pytest.raises(ValueError, match=r"head 'bad': build\(cfg, dim, options\) cannot be called as build\(cfg, "
                                         r"dim\)$"):
        register_head("bad", set(), lambda cfg, dim, options: None)
    assert "bad" not in HEADS and "bad" not in OPTIONS
    register_scale()
    register_head("scale", set(), lambda cfg, dim: ScaleHead(dim, ScaleOptions()))  # registered again, no options
    assert "scale" not in OPTIONS
    with pytest.raises(ConfigError, match="head 'scale' takes no options"):
        isolocal.create_model(NANO, objective="scale", head_options={"scale": {"width": 2}})


# ---------------------------------------------------------------------------------------- the shipped heads

def test_the_former_flat_keys_give_the_same_config_as_the_tables():
    flat = model_config(num_classes=4, head_hidden=16, proj_dim=32, temperature=0.2)
    tables = model_config(head_options={"classify": {"num_classes": 4, "head_hidden": 16},
                                        "contrastive": {"head_hidden": 16, "proj_dim": 32, "temperature": 0.2}})
    assert flat == tables and to_dict(flat) == to_dict(tables)
    assert "proj_dim" not in to_dict(flat)
    both = {"classify": {"head_hidden": 8}, "contrastive": {"head_hidden": 8}}
    assert ModelConfig(head_hidden=8).head_options == both
    # --set over a config file's table: the flat key wins
    run = load_run_config(None, ["model.head_options.contrastive.temperature=0.5", "model.temperature=0.3"])
    assert run.model.head_options == {"contrastive": {"temperature": 0.3}}
    assert StagePlan.from_config(model_config(objective="contrastive", temperature=0.3)).options[0] == \
        ContrastiveOptions(temperature=0.3)


def test_the_former_keys_stay_modelconfig_attributes():
    cfg = isolocal.preset_config(NANO)
    assert (cfg.num_classes, cfg.head_hidden, cfg.proj_dim, cfg.temperature) == (10, 0, 128, 0.1)
    cfg.proj_dim = 16
    cfg.objective = "contrastive"
    assert cfg.head_options == {"contrastive": {"proj_dim": 16}} and cfg.proj_dim == 16
    assert isolocal.StagewiseEncoder(cfg).stages[0].head.proj[2].out_features == 16


@pytest.mark.parametrize("given, message", [
    (["model.temperature=0"], "model.temperature must be > 0, got 0.0"),
    (["model.head_options.contrastive.temperature=0"], "model.head_options.contrastive.temperature must be > 0"),
    (["model.num_classes=1"], "model.num_classes must be >= 2, got 1"),
    (["model.head_options.classify.num_classes=1"], "model.head_options.classify.num_classes must be >= 2"),
    (["model.temperature=nan"], "model.temperature must be a finite number, got nan"),
    (["model.proj_dim=0.5"], "model.proj_dim: 0.5 has the wrong type; expected int"),
    (["model.head_options.contrastive.temp=1"], "unknown option model.head_options.contrastive.temp"),
])
def test_errors_name_the_key_as_it_was_given(given, message):
    with pytest.raises(ConfigError, match=message):
        load_run_config(None, given)


def test_the_written_config_reads_back_with_its_tables(tmp_path):
    run = load_run_config(None, ["model.objective='contrastive'", "model.proj_dim=32",
                                 "model.head_options.contrastive.temperature=0.2"])
    path = tmp_path / "config.toml"
    path.write_text(dumps_toml(to_dict(run)))
    assert "[model.head_options.contrastive]" in path.read_text()
    assert load_run_config(path).model == run.model


def test_a_checkpoint_with_the_former_keys_resumes_under_the_tables():
    """A 0.2 checkpoint's config holds every flat key; the same settings as tables (or defaults) are no
    difference, another value is, named as a head option."""
    run = load_run_config(None, ["model.objective='contrastive'", "model.head_options.contrastive.proj_dim=32"])
    old = to_dict(run)
    old["model"].pop("head_options")
    old["model"].update(num_classes=10, head_hidden=0, proj_dim=32, temperature=0.1)
    saved = {"ranks": [], "config": old, "world_size": 1}
    check_resume(saved, run, 1, ())
    old["model"]["temperature"] = 0.2
    with pytest.raises(ValueError, match=r"cannot resume: the config differs from the checkpoint's in "
                                         r"model.head_options"):
        check_resume(saved, run, 1, ())


def test_the_class_count_check_names_the_option_as_given(tmp_path):
    from isolocal.train.loop import build_train_dataset

    for given, key in (("model.num_classes=3", "model.num_classes"),
                       ("model.head_options.classify.num_classes=3", "model.head_options.classify.num_classes")):
        run = load_run_config(None, ["data.name=synthetic", "data.synthetic_size=8", "model.objective='classify'",
                                     given])
        with pytest.raises(ValueError, match=rf"{key} \(3\) is smaller than the 10 classes of "
                                             rf"data.name='synthetic'; set {key}=10"):
            build_train_dataset(run)
