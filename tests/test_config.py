"""Config loading: TOML + `--set` overrides, strict keys and types, range checks, the shipped recipes."""
from __future__ import annotations

from pathlib import Path

import pytest

import isolocal
from isolocal.config import FAMILY_FIELDS, ConfigError, ModelConfig, RunConfig, from_dict, to_dict
from isolocal.config.load import load_run_config
from isolocal.config.presets import PRESETS, list_models, preset_config
from isolocal.config.schedule import SCHEDULES, resolve_schedule
from isolocal.models.encoder import _family
from isolocal.train.logs import write_config
from isolocal.train.optim import scaled_lr
from isolocal.train.pipeline import costmodel

EXPERIMENTS = Path(isolocal.__file__).resolve().parents[1] / "experiments"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_file_then_overrides_then_preset(tmp_path):
    path = write(tmp_path, 'preset = "localmim_vit_micro"\n[train]\nepochs = 5\nbetas = [0.9, 0.99]\n'
                           '[model]\nboundary = "isolated"\n')
    cfg = load_run_config(path, ["train.epochs=7", "train.base_lr=1e-3", "model.mask_ratio=0.6", "out_dir=runs/x"])
    assert (cfg.train.epochs, cfg.train.base_lr, cfg.train.betas) == (7, 1e-3, [0.9, 0.99])
    assert cfg.out_dir == "runs/x"  # a bare word is a string
    assert (cfg.model.embed_dim, cfg.model.depth, cfg.model.boundary, cfg.model.mask_ratio) == (128, 8, "isolated", 0.6)
    assert isinstance(cfg.train.base_lr, float) and load_run_config(None, ["train.base_lr=1"]).train.base_lr == 1.0


@pytest.mark.parametrize("override,message", [
    ("train.epoch=3", "unknown config key train.epoch"),
    ("model.depths2=[1]", "unknown config key model.depths2"),
    ("optim.lr=1", "unknown config key optim"),
    ("model.depth='x'", "model.depth: 'x' has the wrong type; expected int"),
    ("train.epochs=2.5", "train.epochs: 2.5 has the wrong type; expected int"),
    ("train.per_stage_optimizers=1", "train.per_stage_optimizers: 1 has the wrong type; expected true or false"),
    ("train.betas=[0.9, 'x']", "train.betas[1]: 'x' has the wrong type"),
    ("train.base_lr=-1", "train.base_lr must be > 0, got -1.0"),
    ("train.batch_size=100", "train.batch_size (100) must be divisible by train.accum_steps (3)"),
    ("data.train_subset=-1", "data.train_subset must be >= 0"),
    ("data.name=folder", "data.root must name the image folder"),
    ("train.amp=fp8", "train.amp must be one of auto, bf16, fp16, off"),
    ("preset=vit_huge", "unknown preset 'vit_huge'"),
    ("model.arch=vitt", "model.arch must be one of resnet, swin, vit; got 'vitt'"),
    ("pipeline.schedule=gpipe", "pipeline.schedule must be one of auto, isolated, 1f1b, default, got 'gpipe'"),
    ("eval.feature=max", "eval.feature must be cls or mean, got 'max'"),
])
def test_bad_values_name_the_key(override, message):
    extra = ["train.accum_steps=3", "train.batch_size=99"] if "batch_size" in override else []
    with pytest.raises(ValueError) as err:
        load_run_config(None, [*extra, override])
    assert message in str(err.value)


def test_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        load_run_config(None, ["train.epochs"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_run_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_run_config(write(tmp_path, "[train\n"))


def test_written_config_reads_back_unchanged(tmp_path):
    cfg = load_run_config(None, ["preset=localmim_vit_micro", "model.boundary=[0.0, 0.5, 'global']",
                                 "train.stage_lr_scale=[1.0, 1.0, 0.5, 0.5]", "data.train_subset=100"])
    write_config(cfg, tmp_path)
    assert load_run_config(tmp_path / "config.toml") == cfg
    assert from_dict(RunConfig, to_dict(cfg)) == cfg


RECIPES = ["vit_base_localmim_hog", "vit_large_localmim_hog", "vit_base_mae", "vit_base_maskfeat",
           "fmnist_localmim_global", "fmnist_localmim_isolated", "fmnist_mae"]


@pytest.mark.parametrize("name", RECIPES)
def test_every_run_recipe_loads_and_its_geometry_is_valid(name):
    cfg = load_run_config(EXPERIMENTS / f"{name}.toml")
    taps = _family(cfg.model.arch).taps(cfg.model)  # the model's build-time checks, without building it
    assert [t.scale for t in taps] == cfg.model.scales
    assert cfg.out_dir == f"runs/{name}"


def test_published_recipes_follow_method_section_7():
    base = load_run_config(EXPERIMENTS / "vit_base_localmim_hog.toml")
    assert (base.train.batch_size, base.train.base_lr, base.train.betas, base.train.weight_decay) == (2048, 2e-4, [0.9, 0.95], 0.05)
    assert scaled_lr(base.train) == pytest.approx(1.6e-3)
    assert (base.train.epochs, base.train.warmup_epochs, base.train.clip_grad) == (100, 10, 0.0)
    assert (base.model.taps, base.model.scales, base.model.hog_nbins) == ([1, 3, 9, 11], [4.0, 2.0, 1.0, 0.5], 9)
    large = load_run_config(EXPERIMENTS / "vit_large_localmim_hog.toml")
    assert (large.model.hog_nbins, large.model.hog_bias, large.train.epochs, large.train.warmup_epochs) == (18, True, 800, 40)


def test_cpu_recipes_differ_only_where_they_should():
    glob, iso, mae = (to_dict(load_run_config(EXPERIMENTS / f"fmnist_{n}.toml"))
                      for n in ("localmim_global", "localmim_isolated", "mae"))
    assert glob["model"]["boundary"] == "global" and iso["model"]["boundary"] == "isolated"
    for d in (glob, iso, mae):
        d.pop("out_dir"), d.pop("preset")
        d["model"].pop("boundary")
    assert glob == iso
    assert glob["data"] == mae["data"] and glob["train"] == mae["train"]


def test_every_model_field_is_read_by_some_family():
    read = {name for fields in FAMILY_FIELDS.values() for name in fields}
    assert read == {f for f in ModelConfig.__dataclass_fields__}
    assert set(FAMILY_FIELDS) == {preset_config(n).arch for n in list_models()}


@pytest.mark.parametrize("preset,key,value,default", [
    ("resnet32_k2", "patch_size", "8", "16"),
    ("resnet32_k2", "mask_ratio", "0.5", "0.75"),
    ("localmim_swin_nano", "depth", "3", "12"),
    ("localmim_vit_nano", "window_size", "4", "7"),
    ("localmim_vit_nano", "dense_encoder", "true", "false"),
])
def test_a_field_the_family_ignores_is_refused_unless_default(preset, key, value, default):
    arch = preset_config(preset).arch
    shown = {"true": "True"}.get(value, value)
    with pytest.raises(ConfigError, match=rf"model.{key} = {shown} has no effect on a {arch} model"):
        load_run_config(None, [f"preset={preset}", f"model.{key}={value}"])
    load_run_config(None, [f"preset={preset}", f"model.{key}={default}"])


def test_preset_config_hands_out_copies_of_the_table():
    cfg = preset_config("localmim_vit_nano")
    cfg.taps.append(99)
    assert PRESETS["localmim_vit_nano"].taps == preset_config("localmim_vit_nano").taps == [0, 1, 2, 3]
    assert list_models() == sorted(PRESETS)
def test_one_schedule_vocabulary_resolves_pipeline_schedule():
    """`pipeline.schedule`: "auto" runs "isolated" when every boundary is isolated, else "1f1b"; "default" is
    "1f1b"; "isolated" is refused for a model that lets gradient cross a boundary; anything else names the
    valid values. The cost model simulates exactly these schedules."""
    assert SCHEDULES == ("isolated", "1f1b") and costmodel.SCHEDULES is SCHEDULES
    for value in ("auto", "isolated", "1f1b", "default"):
        assert load_run_config(None, [f"pipeline.schedule={value!r}"]).pipeline.schedule == value
    with pytest.raises(ConfigError, match="pipeline.schedule must be one of auto, isolated, 1f1b, default, got 'gpipe'"):
        load_run_config(None, ["pipeline.schedule='gpipe'"])
    assert resolve_schedule("default", True) == resolve_schedule("1f1b", False) == "1f1b"
    assert resolve_schedule("auto", False) == "1f1b"
    assert resolve_schedule("auto", True) == resolve_schedule("isolated", True) == "isolated"
    with pytest.raises(ValueError, match="pipeline.schedule 'isolated' .* needs every model.boundary isolated"):
        resolve_schedule("isolated", False)
    with pytest.raises(ValueError, match="must be one of auto, isolated, 1f1b, default, got 'Default'"):
        resolve_schedule("Default", True)
