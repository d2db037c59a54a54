"""The raw-pixel floor: the probes' features are the normalized images themselves, with no encoder.

A representation that a k-NN or a linear probe reads no better than the pixels it was computed from
has learnt nothing a classifier could use, so every study measures this floor beside the random-init
encoder. `PixelEncoder` offers the part of the stage-wise encoder's interface the evaluation reads
(`encode`, `taps`, `num_stages`, `family`, `cfg`): one stage, one token per image holding all its
pixels, tapped "before layer 1" (tap index -1, layer 0 in reports).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from isolocal.config import ModelConfig
from isolocal.models.family import Tap


@dataclass(frozen=True)
class PixelTraits:
    """What evaluation and analysis ask of a model's family: no CLS token, no attention, no heads."""

    has_cls: bool = False
    has_attention: bool = False


class PixelEncoder(nn.Module):
    """Images of `cfg`'s size and channels -> one stage of (B, 1, C*H*W) tokens: the pixels."""

    family = PixelTraits()
    objectives: tuple[str, ...] = ()

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        dim = cfg.in_chans * cfg.img_size ** 2
        self.taps = [Tap(index=-1, dim=dim, grid=1, scale=1.0, cell=cfg.img_size)]
        self.register_buffer("anchor", torch.zeros(0), persistent=False)  # follows .to(device)

    @property
    def num_stages(self) -> int:
        return 1

    def encode(self, images: Tensor) -> list[Tensor]:
        return [images.flatten(1).unsqueeze(1).to(self.anchor.device)]
