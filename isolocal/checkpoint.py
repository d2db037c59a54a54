"""Load a trained model from any isolocal checkpoint, whichever runner wrote it.

`load_model_state` is the one place that knows checkpoint formats: a single-process or data-parallel
run writes one file (`isolocal.train.checkpoint`); a pipeline run writes a DeepSpeed directory.
Every reader (`load_checkpoint`, `isolocal export`, evaluation) goes through it.
"""
from __future__ import annotations

import os
from pathlib import Path

from torch import Tensor

from isolocal.config import RunConfig, from_dict
from isolocal.models.mim import LocalMIM


def load_model_state(path: str | os.PathLike) -> tuple[RunConfig, dict[str, Tensor]]:
    """(the run's resolved config, a LocalMIM state dict) from a checkpoint file or directory.

    Pipeline (DeepSpeed directory) checkpoints: extend this function, returning the same pair with
    the per-layer files mapped back to LocalMIM's `stages.<k>.` keys.
    """
    from isolocal.train.checkpoint import load_state

    path = Path(path)
    if path.is_dir():
        from isolocal.pipeline.checkpoint import load_pipeline_state

        return load_pipeline_state(path)
    state = load_state(path)
    if "model" not in state or "config" not in state:
        raise ValueError(f"{path} is not an isolocal checkpoint (it lacks 'model' or 'config')")
    return from_dict(RunConfig, state["config"]), state["model"]


def load_checkpoint(path: str | os.PathLike) -> LocalMIM:
    """The model a checkpoint holds, rebuilt from its saved config, weights loaded strictly, in eval mode."""
    cfg, state_dict = load_model_state(path)
    if cfg.model is None:
        raise ValueError(f"{path}: its config has no resolved model section")
    model = LocalMIM(cfg.model)
    model.load_state_dict(state_dict)
    return model.eval()
