"""The one model loader: every caller that needs a model from a checkpoint, a run or a seed goes here.

`load_model(source, cfg)` takes
- "pixels": no encoder, the images themselves as one stage's features (`models.pixels`), the floor a
  representation must beat;
- "random": `cfg`'s model at its seeded init (`seeded_init`), which is exactly the init training
  starts from, so a control evaluated at "random" is the starting point of the pre-trained runs of
  its seed;
- an isolocal checkpoint file, run directory or pipeline checkpoint (`io.checkpoint`): the model its
  saved config describes (its `imports` imported first), weights loaded strictly; the heads of stages
  whose head type is not registered even then (the user's module is gone) are skipped with one line
  (`io.checkpoint.saved_model`), and the encoder and the other heads still load strictly;
- a published LocalMIM ViT or Swin checkpoint with `cfg` (a run config whose model is the file's, e.g.
  preset `localmim_vit_base` or `localmim_swin_base`; the file's own `args` only name the model): the whole
  `StagewiseEncoder`, decoders included (`io.foreign.published_model`, docs/method.md §9);
- with `encoder_only=True` also a ViT encoder trained elsewhere (timm ViT state dict, MAE, published
  LocalMIM ViT; `io.foreign`), as a timm ViT. Without it (and without a config for a published LocalMIM
  file) such a file is refused: it lacks the stage heads or the config the other callers (eval,
  export, reconstruct) need.
Every model comes back in eval mode.
"""
from __future__ import annotations

import argparse
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from isolocal.config import RunConfig
from isolocal.errors import CheckpointError
from isolocal.io.checkpoint import (check_fits, checked_state, is_isolocal, locate, pipeline_model_state, saved_model,
                                    torch_load, without_skipped_heads)
from isolocal.io.foreign import build_timm_vit, is_published_localmim, published_model, timm_state_dict
from isolocal.models.encoder import StagewiseEncoder
from isolocal.models.pixels import PixelEncoder

RANDOM = "random"  # the source that means "the config's model at its seeded init"
PIXELS = "pixels"  # the source that means "no encoder: the config's images as features" (the pixel floor)
RUN_SOURCES = "a checkpoint or a run directory"  # what a source must be when no config is given


def seeded_init(cfg: RunConfig) -> StagewiseEncoder:
    """`cfg`'s model at its seeded init (`train.seed`): the same weights in every process and mode, in
    training and as the "random" baseline. Leaves the global torch RNG seeded with `train.seed`."""
    torch.manual_seed(cfg.train.seed)
    return StagewiseEncoder(cfg.model)


def _read(path: Path) -> Any:
    """A checkpoint file's object: safetensors, or torch (mmap for zip files, so telling formats apart
    does not read every tensor). Pickled argparse Namespaces (the 'args' of MAE and published LocalMIM
    files) are allowed, code is not."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file  # optional: only safetensors files need it

        return load_file(path)
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch_load(path, map_location="cpu", mmap=zipfile.is_zipfile(path))


def _isolocal_model(model: StagewiseEncoder, state_dict: dict[str, Tensor], path: Path) -> StagewiseEncoder:
    """`model` (`saved_model` of the checkpoint's config) with the checkpoint's weights, loaded strictly but for
    the heads it skipped."""
    state_dict = without_skipped_heads(model, state_dict)
    check_fits(model, state_dict, path)
    model.load_state_dict(state_dict)
    return model.eval()


def _open(source: str | os.PathLike, valid: str) -> tuple[Path, Any]:
    """(path, the file's object) of a checkpoint source, None as the object for a pipeline checkpoint
    (read by `pipeline_model_state`); a missing source names the `valid` ones."""
    if not Path(source).exists():
        raise FileNotFoundError(f"checkpoint {source} does not exist; pass {valid}")
    kind, path = locate(source)
    return path, None if kind == "pipeline" else _read(path)


def _run_and_model(path: Path, obj: Any) -> tuple[RunConfig, StagewiseEncoder]:
    """An isolocal checkpoint's saved config and model: a pipeline checkpoint (`obj` None) or a file's object."""
    if obj is None:
        cfg, model, state = pipeline_model_state(path)
    else:
        cfg, state = checked_state(obj, path)
        model = saved_model(cfg, path)
    return cfg, _isolocal_model(model, state, path)


def load_run(source: str | os.PathLike) -> tuple[RunConfig, StagewiseEncoder]:
    """(the run's saved config, its model in eval mode) from an isolocal checkpoint or run directory, for a
    caller that needs the run's settings besides its weights (`isolocal export` records `eval.feature`);
    other files are refused as `load_model` refuses them without a config."""
    path, obj = _open(source, RUN_SOURCES)
    if obj is not None and not is_isolocal(obj):
        raise _not_isolocal(obj, path)
    return _run_and_model(path, obj)


def _published(obj: Any, cfg: RunConfig, path: Path) -> StagewiseEncoder:
    if cfg.model is None:
        raise ValueError(f"{path} is a published LocalMIM checkpoint: the config given for it has no resolved model "
                         "section (load it with isolocal.config.load_run_config)")
    return published_model(obj, cfg.model, path, f"the given config describes (preset {cfg.preset})").eval()


def _not_isolocal(obj: Any, path: Path) -> CheckpointError:
    """Why a file that is not an isolocal checkpoint cannot give a full model."""
    if is_published_localmim(obj):
        return CheckpointError(f"{path} is a published LocalMIM checkpoint: it holds the encoder and decoders but no "
                               "isolocal config; pass the config of its model (load_model(path, cfg); on the command "
                               "line -c run.toml or --set preset=localmim_vit_base / localmim_swin_base), or, for a "
                               "ViT, encoder_only=True for the encoder as a timm ViT")
    try:
        timm_state_dict(obj, path)
    except ValueError:
        return CheckpointError(f"{path} is not an isolocal checkpoint (it lacks 'model' or 'config')")
    return CheckpointError(f"{path} holds an encoder only (timm, MAE or LocalMIM format), without the stage heads "
                           "and config of an isolocal checkpoint ('model' + 'config'), which this needs")


def load_model(source: str | os.PathLike, cfg: RunConfig | None = None, *,
               arch_hint: Mapping[str, Any] | None = None, encoder_only: bool = False) -> nn.Module:
    """The model `source` names, in eval mode (module docstring): a `StagewiseEncoder`, or with `encoder_only`
    a timm ViT for encoders trained elsewhere. `cfg` is read for "random" and for a published LocalMIM
    checkpoint (its model); an isolocal checkpoint carries its own config. `arch_hint` holds
    `timm.create_model` overrides for timm-named formats, chiefly `{"num_heads": N}` for non-standard widths."""
    if isinstance(source, str) and source == RANDOM:
        if cfg is None:
            raise ValueError("'random' is a run config's model at its seeded init: pass the config")
        return seeded_init(cfg).eval()
    if isinstance(source, str) and source == PIXELS:
        if cfg is None or cfg.model is None:
            raise ValueError("'pixels' reads images of a run config's model size and channels: pass the config")
        return PixelEncoder(cfg.model).eval()
    path, obj = _open(source, "a checkpoint, a run directory, 'random' or 'pixels'" if cfg is not None else RUN_SOURCES)
    if obj is None or is_isolocal(obj):
        return _run_and_model(path, obj)[1]
    if cfg is not None and not encoder_only and is_published_localmim(obj):
        return _published(obj, cfg, path)
    if not encoder_only:
        raise _not_isolocal(obj, path)
    return build_timm_vit(timm_state_dict(obj, path), arch_hint, path).eval()

