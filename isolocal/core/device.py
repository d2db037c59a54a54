"""Where a run computes: the torch device and autocast dtype a config's `train.device` / `train.amp` name.

Every command that builds a model (pretrain, pipeline, eval, info) resolves them here, so "auto"
means the same thing everywhere.
"""
from __future__ import annotations

import torch

from isolocal.config import ConfigError


def resolve_device(name: str) -> torch.device:
    """"auto" -> CUDA when available, else CPU; asking for CUDA without one is a config error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device = 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device(name)


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype: bf16 on CUDA for "auto"; full precision on CPU unless asked for."""
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]
