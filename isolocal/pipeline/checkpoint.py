"""Pipeline checkpoints (DeepSpeed directories) <-> the single-process LocalMIM state dict.

`engine.save_checkpoint(root, tag, client_state)` writes, under `root/<tag>/`:
- `layer_XX-model_states.pt`: layer XX's own state dict. A layer is LocalMIM stage XX, so its keys
  become `stages.XX.<key>`; the files load under any partition, including one process.
- `mp_rank_XX_model_states.pt`: pipeline rank XX's optimizer state and the client state, where the
  runner stores the run config (`"config"`) and its position in the run.
`root/latest` names the newest tag.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import Tensor

from isolocal.config import RunConfig, from_dict, to_dict
from isolocal.models.mim import LocalMIM

RUN_SUBDIR = "pipeline"  # where the runner keeps a run's checkpoints: <out_dir>/pipeline/<tag>/
_LAYER_FILE = re.compile(r"layer_(\d+)-model_states\.pt")


def checkpoint_dir(path: str | os.PathLike, tag: str | None = None) -> Path:
    """The tag directory of a pipeline checkpoint (`tag` None: the one `latest` names); `path` may be
    the tag directory, the checkpoint root or the run directory holding it."""
    root = Path(path)
    if (root / RUN_SUBDIR / "latest").is_file():
        root = root / RUN_SUBDIR
    if tag is None:
        if any(_LAYER_FILE.fullmatch(p.name) for p in root.glob("layer_*")):
            return root  # already a tag directory
        latest = root / "latest"
        if not latest.is_file():
            raise FileNotFoundError(f"{root} is not a pipeline checkpoint: it has neither layer files "
                                    "nor a 'latest' file")
        tag = latest.read_text().strip()
    tag_dir = root / tag
    if not tag_dir.is_dir():
        tags = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise FileNotFoundError(f"no checkpoint tag {tag!r} in {root}; tags there: {', '.join(tags) or 'none'}")
    return tag_dir


def client_state(path: str | os.PathLike, tag: str | None = None) -> dict:
    """The runner's client state (config, step, ...) saved with a pipeline checkpoint."""
    tag_dir = checkpoint_dir(path, tag)
    files = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise FileNotFoundError(f"{tag_dir} has no mp_rank_*_model_states.pt (the run's client state)")
    return torch.load(files[0], map_location="cpu", weights_only=True)


def pipeline_state_dict(path: str | os.PathLike, tag: str | None = None) -> dict[str, Tensor]:
    """A LocalMIM state dict (`stages.<k>.` keys) from a pipeline checkpoint's layer files."""
    tag_dir = checkpoint_dir(path, tag)
    state: dict[str, Tensor] = {}
    layers = []
    for file in sorted(tag_dir.iterdir()):
        match = _LAYER_FILE.fullmatch(file.name)
        if match:
            k = int(match.group(1))
            layers.append(k)
            for key, value in torch.load(file, map_location="cpu", weights_only=True).items():
                state[f"stages.{k}.{key}"] = value
    if layers != list(range(len(layers))) or not layers:
        raise ValueError(f"{tag_dir}: layer files {layers} are not one per stage 0..S-1")
    return state


def load_pipeline_state(path: str | os.PathLike, tag: str | None = None) -> tuple[RunConfig, dict[str, Tensor]]:
    """(the run's config, a full LocalMIM state dict): what `isolocal.checkpoint.load_model_state` returns.

    Layer files hold only the stages; the model's other state (the seeded HOG bias) is rebuilt from
    the config.
    """
    state = client_state(path, tag)
    if "config" not in state:
        raise ValueError(f"{checkpoint_dir(path, tag)} was not written by isolocal's pipeline runner (no config)")
    cfg = from_dict(RunConfig, state["config"])
    full = LocalMIM(cfg.model).state_dict()
    stages = pipeline_state_dict(path, tag)
    if not stages.keys() <= full.keys():
        raise ValueError(f"{checkpoint_dir(path, tag)}: layer keys {sorted(stages.keys() - full.keys())[:3]} "
                         "do not belong to the model its config describes")
    return cfg, {**full, **stages}


def convert_pipeline_checkpoint(path: str | os.PathLike, out: str | os.PathLike, tag: str | None = None) -> Path:
    """Write a single-process checkpoint file (`{"model", "config"}`) from a pipeline checkpoint."""
    from isolocal.train.checkpoint import atomic_save

    cfg, state = load_pipeline_state(path, tag)
    return atomic_save({"model": state, "config": to_dict(cfg)}, out)
