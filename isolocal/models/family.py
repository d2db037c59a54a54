"""The one grid source: token grids, tap scales, target cells and decoder outputs, checked together.

Every shape a model needs is derived here from its config, at build time, so a bad combination is
a ValueError naming the field (never a shape error deep inside a forward).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from isolocal.config import ModelConfig
from isolocal.heads.plan import StagePlan


@dataclass(frozen=True)
class Tap:
    """Where a local head reads the encoder and what it reconstructs."""

    index: int  # 0-based encoder block (ViT) or Swin stage
    dim: int  # encoder width at the tap
    grid: int  # encoder token grid side at the tap
    scale: float  # decoder output grid = grid * scale
    cell: int  # target cell side in pixels

    @property
    def out_grid(self) -> int:
        return int(self.grid * self.scale)


@dataclass(frozen=True)
class Family:
    """What a model family (columnar ViT, pyramidal Swin, ResNet) supplies to the stage-wise encoder."""

    taps: Callable[[ModelConfig], list[Tap]]
    build_stages: Callable[[ModelConfig, list[Tap], StagePlan], list[Any]]  # one stage per tap, with its head
    mask_grid: Callable[[ModelConfig], int]  # side of the grid masks are drawn on
    # (cfg, mask on the model's device or None, the same mask on the host or None) -> what the stages need
    context: Callable[[ModelConfig, Any, Any], Any]
    has_cls: bool
    # export to timm (see timm_export.py): (model) -> (timm name, create_model overrides); (model) -> weights
    timm_name_and_kwargs: Callable[[Any], tuple[str, dict[str, Any]]]
    timm_state_dict: Callable[[Any], dict[str, Any]]
    # (eval.feature, checked) -> create_model overrides whose pooled output is that feature of the last stage
    timm_pool_kwargs: Callable[[str], dict[str, Any]]
    has_attention: bool = True  # False: no attention to analyse (NMI, attention distance, attention maps)
    decoders: bool = True  # False: stages have no token grid, so no head may reconstruct (`mim`)
    # What a head may read beyond its stage (`isolocal.heads.ModelView`); None: the family offers none.
    # (cfg, the layer whose output they read, backbone layers, width ratio) -> (fresh layers like those, their width)
    copy_layers: Callable[[ModelConfig, int, Sequence[int], float], tuple[nn.Module, int]] | None = None
    # a stage -> its layers up to its features, sharing their parameters (no head)
    live_layers: Callable[[nn.Module], nn.Module] | None = None


FEATURES = ("cls", "mean")  # eval.feature: a stage's tokens pooled to one vector per image


def check_feature(feature: str, has_cls: bool) -> None:
    """Reject a pooling the model cannot provide, before any images are read."""
    if feature not in FEATURES:
        raise ValueError(f"eval.feature must be one of {', '.join(FEATURES)}, got {feature!r}")
    if feature == "cls" and not has_cls:
        raise ValueError("eval.feature = 'cls' needs a model with a CLS token and this one has none; use 'mean'")


def require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def check_common(cfg: ModelConfig) -> None:
    """Checks that do not depend on the family and that the config's ranges (`validate_model`, run
    first) cannot make alone: they relate fields to each other."""
    require(cfg.img_size % cfg.patch_size == 0,
            f"img_size {cfg.img_size} must be divisible by patch_size {cfg.patch_size}")
    require(len(cfg.taps) >= 1, "taps must list at least one block")
    require(len(cfg.scales) == len(cfg.taps),
            f"scales must have one entry per tap ({len(cfg.taps)}), got {len(cfg.scales)}")
    require(all(b > a for a, b in zip(cfg.taps, cfg.taps[1:])), f"taps must be increasing, got {cfg.taps}")
    for name in ("decoder_dim", "decoder_heads"):
        values = getattr(cfg, name)
        require(len(values) in (1, len(cfg.taps)),
                f"{name} must have 1 entry or one per tap ({len(cfg.taps)}), got {values}")
    require(cfg.decoder_depth >= 1, f"decoder_depth must be >= 1, got {cfg.decoder_depth}")


def per_tap(values: list, k: int) -> Any:
    """A decoder setting given once for all taps or once per tap."""
    return values[0] if len(values) == 1 else values[k]


def make_tap(cfg: ModelConfig, k: int, index: int, dim: int, grid: int, stride: int) -> Tap:
    """Tap k at encoder `grid` (tokens of `stride` px), validated against its scale and target."""
    scale = cfg.scales[k]
    log = math.log2(scale)  # scales are > 0: the config's ranges are checked first
    require(log == int(log),
            f"scales[{k}] = {scale} must be a power of two (0.25, 0.5, 1, 2, 4, ...)")
    out = grid * scale
    require(out >= 1 and out == int(out),
            f"scales[{k}] = {scale} gives a non-integer output grid {grid} x {scale} = {out}; "
            f"valid scales for this {grid}x{grid} grid are powers of two with integer results")
    cell = stride / scale
    require(cell >= 1 and cell == int(cell),
            f"scales[{k}] = {scale} gives a target cell of {cell} px (token stride {stride} px / scale); "
            "the cell must be a whole number of pixels")
    dec_dim = per_tap(cfg.decoder_dim, k)
    if scale > 1:
        require(dec_dim % int(scale) == 0,
                f"decoder_dim {dec_dim} must be divisible by scales[{k}] = {scale} (channels halve per x2)")
    return Tap(index=index, dim=dim, grid=grid, scale=scale, cell=int(cell))
