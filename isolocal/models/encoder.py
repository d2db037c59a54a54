"""The MIM model: stages + local heads + targets + boundaries; forward(images, mask) -> per-stage losses.

LocalMIM, MAE, MaskFeat and SimMIM-style baselines are configs of this one model. The forward is
written so that every runner (single process global or isolated, data parallel, pipeline) runs the
same per-stage step, `stage_step`, and so computes the same numbers.
"""
from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from isolocal.config import Boundary, ModelConfig
from isolocal.heads import HEADS, HeadInputs, needs_of, parse_objectives
from isolocal.heads.base import as_labels, config_needs
from isolocal.core.masking import random_mask, regrid, to_device, visible_count
from isolocal.models.family import Family
from isolocal.core.targets import TargetBank


@dataclass
class MIMOutput:
    loss: Tensor  # sum of the per-stage losses
    losses: list[Tensor]  # one per stage
    mask: Tensor  # (B, L) bool, True = masked
    preds: list[Tensor] | None = None  # (B, cells_k, dim_k) per stage, on request


@dataclass
class Batch:
    """What every stage step needs besides its input: token selection, targets, loss weights."""

    ctx: Any
    targets: list[Tensor | None]  # None for stages a caller did not ask for
    weights: list[Tensor | None]  # the mask at each tap's output grid (1 = masked, fractional when pooled)
    labels: Tensor | None  # (B,) class indices, repeated over views, when a head needs them (else None)
    views: int  # images per sample, stacked along the batch as [view 1; view 2]


class _GradScale(torch.autograd.Function):
    """Identity forward, gradient times alpha backward (the scaled boundary)."""

    @staticmethod
    def forward(ctx, x: Tensor, alpha: float) -> Tensor:
        ctx.alpha = alpha
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.alpha, None


def cross_boundary(x: Tensor, alpha: float) -> Tensor:
    """Pass the residual stream into the next stage: alpha 1 = global, 0 = isolated (detached)."""
    if alpha == 1.0:
        return x
    if alpha == 0.0:
        return x.detach()
    return _GradScale.apply(x, alpha)


def parse_boundaries(spec: Boundary, count: int) -> list[float]:
    """'global' | 'isolated' | alpha | a list of those, one per boundary -> list of alphas."""
    items = spec if isinstance(spec, list) else [spec] * count
    if len(items) != count:
        raise ValueError(f"boundary list must have one entry per boundary ({count}), got {len(items)}: {spec}")
    alphas = []
    for item in items:
        if item == "global":
            alphas.append(1.0)
        elif item == "isolated":
            alphas.append(0.0)
        elif isinstance(item, (int, float)) and not isinstance(item, bool) and 0.0 <= item <= 1.0:
            alphas.append(float(item))
        else:
            raise ValueError(f"boundary {item!r} is not valid; use 'global', 'isolated' or an alpha in [0, 1]")
    return alphas


def masked_mse(pred: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    """Mean squared error per location, averaged over masked locations of the whole batch."""
    err = (pred.float() - target).pow(2).mean(dim=-1)
    return (err * weight).sum() / weight.sum()


def _init_weights(module: nn.Module) -> None:
    """MAE's init: xavier-uniform linears (and patch projection), zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _compiled_in_training(module: nn.Module, compiled: Callable, eager: Callable, *args: Any) -> Any:
    """The compiled graph for training calls, the eager method otherwise (see `compile_stages`)."""
    return compiled(*args) if module.training and torch.is_grad_enabled() else eager(*args)


def _require(ok: Tensor, message: str) -> None:
    """A value check with no host read: raises ValueError at once on the CPU; on an accelerator it is
    a device-side assert (like `check_visible_count`), so the training step never waits for it."""
    try:
        torch._assert_async(ok, message)
    except RuntimeError:
        raise ValueError(message) from None


_FAMILIES = {"vit": "isolocal.models.vit:VIT", "swin": "isolocal.models.swin:SWIN",
             "resnet": "isolocal.models.resnet:RESNET"}


def _family(arch: str) -> Family:
    if arch not in _FAMILIES:
        raise ValueError(f"arch must be one of {sorted(_FAMILIES)}, got {arch!r}")
    module, name = _FAMILIES[arch].split(":")
    return getattr(importlib.import_module(module), name)


class LocalMIM(nn.Module):
    """An encoder split into stages, each with its own local head's loss (`model.objective`,
    `isolocal.heads`): LocalMIM's decoder (`mim`) or another registered head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.family = _family(cfg.arch)
        self.taps = self.family.taps(cfg)
        self.mask_grid = self.family.mask_grid(cfg)
        self.alphas = parse_boundaries(cfg.boundary, len(self.taps) - 1)
        self.objectives = parse_objectives(cfg.objective, len(self.taps))
        self.needs = needs_of(self.objectives)  # what the heads need from the data, together
        self.stages = nn.ModuleList(self.family.build_stages(cfg, self.taps))
        self.target_bank = TargetBank(cfg.target, [t.cell for t in self.taps], cfg.hog_nbins, cfg.hog_bias,
                                      cfg.hog_bias_seed)
        self.apply(_init_weights)
        for stage in self.stages:
            for name in ("cls_token", "mask_token"):
                if hasattr(stage, name):
                    nn.init.normal_(getattr(stage, name), std=0.02)
            if hasattr(stage, "decoder"):
                nn.init.normal_(stage.decoder.mask_token, std=0.02)
            if hasattr(stage, "patch_embed"):
                w = stage.patch_embed.proj.weight
                nn.init.xavier_uniform_(w.view(w.shape[0], -1))

    @staticmethod
    def check_config(cfg: ModelConfig) -> None:
        """Validate a config's geometry and boundaries without allocating any weights."""
        family = _family(cfg.arch)
        parse_boundaries(cfg.boundary, len(family.taps(cfg)) - 1)
        parse_objectives(cfg.objective, len(cfg.taps))

    @staticmethod
    def check_masking(cfg: ModelConfig) -> None:
        """Validate that the config's masks can be drawn (mask unit divides the grid, >= 1 visible unit):
        a training run checks it before any work, not at its first step."""
        visible_count(_family(cfg.arch).mask_grid(cfg), cfg.mask_ratio, cfg.mask_unit)

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def img_size(self) -> int:
        return self.cfg.img_size

    def set_boundary(self, spec: Boundary) -> None:
        """Switch the gradient policy between stages (weights unchanged)."""
        self.alphas = parse_boundaries(spec, self.num_stages - 1)
        self.cfg.boundary = spec

    @property
    def views(self) -> int:
        """Images per sample the heads train on: 2 (stacked [view 1; view 2]) when a head contrasts views."""
        return config_needs(self.cfg)[1]

    def target_stages(self, stages: Sequence[int] | None) -> Sequence[int] | None:
        """Which of `stages` (None: all) need a reconstruction target: all of them when every head is `mim`."""
        if all(name == "mim" for name in self.objectives):
            return stages
        return [k for k in (range(self.num_stages) if stages is None else stages)
                if "target" in HEADS[self.objectives[k]].needs]

    @property
    def grad_checkpoint(self) -> bool:
        """`train.grad_checkpoint`: every stage recomputes its blocks' activations in backward
        (`isolocal.models.recompute`), the end-to-end memory baseline local training is compared with."""
        return all(getattr(stage, "grad_checkpointing", False) for stage in self.stages)

    @grad_checkpoint.setter
    def grad_checkpoint(self, enabled: bool) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enabled

    @property
    def isolated(self) -> bool:
        """True when no gradient crosses any boundary (stage-wise training is then exact)."""
        return all(a == 0.0 for a in self.alphas)

    def random_mask(self, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
        """A (B, L) bool mask (True = masked) from the config's ratio, unit and per-batch mode."""
        return random_mask(batch_size, self.mask_grid, self.cfg.mask_ratio, generator,
                           self.cfg.mask_unit, self.cfg.mask_per_batch)

    @property
    def num_visible(self) -> int:
        """Visible tokens per image in every mask this model trains on (what `random_mask` draws)."""
        return visible_count(self.mask_grid, self.cfg.mask_ratio, self.cfg.mask_unit)

    def check_images(self, images: Tensor) -> None:
        """(B, in_chans, img_size, img_size) floating-point images, B >= 1, finite: shape and dtype read
        no values; finiteness is checked without a host read (`_require`)."""
        if not isinstance(images, Tensor) or not images.is_floating_point():
            what = images.dtype if isinstance(images, Tensor) else type(images).__name__
            raise TypeError(f"images must be a floating-point tensor, got {what}")
        c, s = self.cfg.in_chans, self.cfg.img_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (c, s, s) or images.shape[0] < 1:
            raise ValueError(f"images must have shape (batch >= 1, {c}, {s}, {s}), got {tuple(images.shape)}")
        _require(torch.isfinite(images).all(), "images must be finite; they hold NaN or inf values")

    def check_mask(self, mask: Tensor, batch: int) -> None:
        """A (batch, tokens) bool mask (True = masked) with >= 1 visible and >= 1 masked token per image."""
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            what = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
            raise TypeError(f"mask must be a bool tensor (True = masked), got {what}; use mask.bool() or "
                            "model.random_mask")
        expected = (batch, self.mask_grid ** 2)
        if tuple(mask.shape) != expected:
            raise ValueError(f"mask must have shape {expected} (batch, tokens), got {tuple(mask.shape)}")
        _require(mask.any(1).all() & (~mask).any(1).all(),
                 "every mask row needs at least one visible (False) and one masked (True) token")

    def prepare(self, images: Tensor, mask: Tensor, stages: Sequence[int] | None = None,
                labels: Tensor | None = None) -> Batch:
        """Targets and loss weights for every stage (or only for `stages`, None for the others: what a
        pipeline rank owns), and the token selection for the encoder. Only `mim` stages get targets;
        when no head needs the mask the encoder sees every token. `labels` (one per sample, i.e. per
        B / views images) are required when a head needs them.

        Made for the hot loop: no host sync. A host mask reaches the device with a non-blocking copy
        (Swin plans its windows from the host copy first); token selection is sized by the config's
        keep count, not read from the mask. Targets and weights are computed with autocast disabled,
        in fp32 whatever the caller's autocast (CUDA autocast would run the pixel target's einsum in bf16).
        """
        self.check_images(images)
        self.check_mask(mask, images.shape[0])
        labels = as_labels(labels, images.shape[0], self.views) if "labels" in self.needs else None
        stages = self.target_stages(stages)
        host = mask if mask.device.type == "cpu" else None
        (mask,) = to_device([mask], images.device)
        with torch.autocast(images.device.type, enabled=False):
            targets = self.target_bank(images, stages)
            weights = [regrid(mask, self.mask_grid, t.out_grid / self.mask_grid) if target is not None else None
                       for t, target in zip(self.taps, targets)]
        if "mask" not in self.needs:  # no head reconstructs: the encoder reads whole images
            mask = host = None
        return Batch(self.family.context(self.cfg, mask, host), targets, weights, labels, self.views)

    def stage_step(self, k: int, x: Tensor, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """Run stage k on its input: (output tokens, local loss, prediction). A `mim` stage's head is its
        decoder (`predict`, compiled with the stage); any other reads the stage's normalized output."""
        stage = self.stages[k]
        x = stage(x, batch.ctx)
        if self.objectives[k] != "mim":
            out = stage.head.loss(stage.features(x), HeadInputs(int(self.family.has_cls), batch.labels, batch.views))
            return x, out.loss, out.pred
        pred = stage.predict(x, batch.ctx)
        return x, masked_mse(pred, batch.targets[k], batch.weights[k]), pred

    def forward(self, images: Tensor, mask: Tensor, return_pred: bool = False,
                labels: Tensor | None = None) -> MIMOutput:
        batch = self.prepare(images, mask, labels=labels)
        x, losses, preds = images, [], []
        for k in range(self.num_stages):
            if k > 0:
                x = cross_boundary(x, self.alphas[k - 1])
            x, loss, pred = self.stage_step(k, x, batch)
            losses.append(loss)
            preds.append(pred)
        return MIMOutput(torch.stack(losses).sum(), losses, mask, preds if return_pred else None)

    def encode(self, images: Tensor) -> list[Tensor]:
        """Full unmasked images -> each stage's normalized output tokens."""
        self.check_images(images)
        ctx = self.family.context(self.cfg, None, None)
        x, feats = images, []
        for stage in self.stages:
            x = stage(x, ctx)
            feats.append(stage.features(x))
        return feats

    def compile_stages(self, backend: str | Callable = "inductor") -> None:
        """`torch.compile` each stage's training forward and its head (`predict`), with fixed shapes.

        Only training calls run compiled (`self.training` and grad enabled): every stage then compiles
        once, on the first training step, into a static-shape graph (stage 0 reads 4-D images, the
        others 3-D tokens; the ViT's keep count comes from the config, so no shape changes between
        steps) and never recompiles. Eval-mode forwards (features, k-NN, probes, `info`) run eager,
        so they add no cache entries. State-dict keys are unchanged. Not supported for Swin: its
        packed window groups change size every batch, so a compiled stage would recompile or fall
        back to dynamic shapes; Swin warns and stays eager.
        """
        if self.cfg.arch == "swin":
            warnings.warn("torch.compile is not supported for Swin (packed window groups change shape every "
                          "batch); training runs eager", stacklevel=2)
            return
        # Stages share their classes' code objects: each stage is one cache entry of them (`cache_size_limit`
        # is the recompile limit's name in every torch this supports).
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, self.num_stages)
        for stage in self.stages:
            for name in ("forward", "predict"):
                eager = getattr(stage, name)
                compiled = torch.compile(eager, backend=backend, dynamic=False)
                setattr(stage, name, partial(_compiled_in_training, stage, compiled, eager))

    def stage_of(self, param_name: str) -> int:
        """Index of the stage owning a parameter (names start with `stages.<k>.`)."""
        return int(param_name.split(".")[1])
