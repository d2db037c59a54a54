"""The stage-wise encoder: stages + local heads + targets + boundaries; forward(images, mask) -> per-stage losses
(the mask only when a head needs one: `model(images)` otherwise).

Any family (ViT, Swin, ResNet) split into stages, each trained by its own local head: LocalMIM, MAE,
MaskFeat and SimMIM-style baselines, and supervised or contrastive local learning, are configs of this
one model. Every runner (single process global or isolated, data parallel, pipeline) runs the same
stage loop (`stages_of`, over `isolocal.core.stages.iter_stages`) of the same per-stage step,
`stage_step`, and so computes the same numbers.
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from isolocal.config import Boundary, ModelConfig, from_dict, to_dict
from isolocal.config.presets import preset_config
from isolocal.config.validate import validate_model
from isolocal.core.masking import random_mask, regrid, to_device, visible_count
from isolocal.core.stages import StageResult, iter_stages
from isolocal.core.targets import TargetBank
from isolocal.heads import HEADS, HeadInputs, StagePlan
from isolocal.heads.base import ModelView, as_labels
from isolocal.models import resnet, swin, vit
from isolocal.models.family import Family, Tap
from isolocal.models.init_weights import mae_init


@dataclass
class StageOutput:
    """What a forward returns: every stage's local loss, and the mask it ran under."""

    loss: Tensor  # sum of the per-stage losses
    losses: list[Tensor]  # one per stage
    mask: Tensor | None  # (B, L) bool, True = masked; None when no head needs one and none was given
    preds: list[Tensor] | None = None  # (B, cells_k, dim_k) per stage, on request
    logs: list[dict[str, Tensor | float]] = field(default_factory=list)  # each stage's head logs (`HeadOutput.logs`)


MIMOutput = StageOutput  # the former name, kept for existing code


@dataclass
class Batch:
    """What every stage step needs besides its input: token selection, targets, loss weights."""

    ctx: Any
    targets: list[Tensor | None]  # None for stages a caller did not ask for
    weights: list[Tensor | None]  # the mask at each tap's output grid (1 = masked, fractional when pooled)
    labels: Tensor | None  # (B,) class indices, repeated over views, when a head needs them (else None)
    views: int  # images per sample, stacked along the batch as [view 1; view 2]
    images: Tensor | None = None  # the input images, when a head needs them ("image"), else None


def masked_mse(pred: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    """Mean squared error per location, averaged over masked locations of the whole batch."""
    err = (pred.float() - target).pow(2).mean(dim=-1)
    return (err * weight).sum() / weight.sum()


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


FAMILIES: dict[str, Family] = {"vit": vit.VIT, "swin": swin.SWIN, "resnet": resnet.RESNET}  # model.arch -> family


def _family(arch: str) -> Family:
    if arch not in FAMILIES:
        raise ValueError(f"arch must be one of {sorted(FAMILIES)}, got {arch!r}")
    return FAMILIES[arch]


def _resolve(cfg: ModelConfig, skip_missing_heads: bool = False) -> tuple[Family, list[Tap], StagePlan]:
    """A config's family, taps and stage plan, checked together (the config's own ranges, as a run config
    checks them; geometry, boundaries, heads) before any weights exist: `create_model` and
    `StagewiseEncoder(cfg)` refuse what `isolocal pretrain` refuses."""
    validate_model(cfg)
    family = _family(cfg.arch)
    taps = family.taps(cfg)
    plan = StagePlan.from_config(cfg, skip_missing_heads)
    if not family.decoders and plan.target_stages:
        names = " / ".join(sorted({repr(plan.objectives[k]) for k in plan.target_stages}))
        valid = ", ".join(repr(name) for name, head in sorted(HEADS.items()) if not head.reconstructs)
        raise ValueError(f"model.objective {names} (stages {plan.target_stages}) needs a token grid and a decoder, "
                         f"which a {cfg.arch} stage does not have; use one of {valid}")
    return family, taps, plan


class StagewiseEncoder(nn.Module):
    """An encoder (ViT, Swin or ResNet) split into stages, each with its own local head's loss
    (`model.objective`, `isolocal.heads`): LocalMIM's decoder (`mim`) or another registered head, with a
    boundary between stages (`model.boundary`) that lets all, some or none of the gradient through.
    `skip_missing_heads`: a stage whose head is not registered in this process gets a `SkippedHead` (no
    parameters) instead of failing, for a model loaded for its encoder only (`model.plan.skipped`)."""

    def __init__(self, cfg: ModelConfig, skip_missing_heads: bool = False):
        super().__init__()
        self.cfg = cfg
        self.family, self.taps, self.plan = _resolve(cfg, skip_missing_heads)
        self.mask_grid = self.family.mask_grid(cfg)
        self.stages = nn.ModuleList(self.family.build_stages(cfg, self.taps, self.plan))
        self.target_bank = TargetBank(cfg.target, [t.cell for t in self.taps], cfg.hog_nbins, cfg.hog_bias,
                                      cfg.hog_bias_seed)
        self.apply(mae_init)
        for stage in self.stages:
            for name in ("cls_token", "mask_token"):
                if hasattr(stage, name):
                    nn.init.normal_(getattr(stage, name), std=0.02)
            if hasattr(stage, "decoder"):
                nn.init.normal_(stage.decoder.mask_token, std=0.02)
            if hasattr(stage, "patch_embed"):
                w = stage.patch_embed.proj.weight
                nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        for k, stage in enumerate(self.stages):  # heads that read beyond their stage see it initialised
            if hasattr(stage, "head"):
                stage.head.bind(self.head_view(k))

    def head_view(self, k: int) -> ModelView:
        """What stage k's head may read of the model beyond its stage (`StageHead.bind`): the family's copies
        of later layers, and the next stage's live layers when the head needs "next_stage"."""
        starts = [0] + [t.index + 1 for t in self.taps[:-1]]
        copier, live = self.family.copy_layers, self.family.live_layers
        needs_next = "next_stage" in self.plan.heads[k].needs
        given = needs_next and live is not None and k + 1 < self.num_stages
        return ModelView(self.plan.objectives[k], self.cfg.arch, k,
                         tuple(range(s, t.index + 1) for s, t in zip(starts, self.taps)),
                         partial(copier, self.cfg) if copier is not None else None, needs_next,
                         live(self.stages[k + 1]) if given else None)

    @staticmethod
    def check_config(cfg: ModelConfig) -> None:
        """Validate a config's geometry, boundaries and heads without allocating any weights."""
        _resolve(cfg)

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
        self.plan = self.plan.with_boundary(spec)
        self.cfg.boundary = spec

    @property
    def alphas(self) -> list[float]:
        """The gradient scale of each boundary: 1 global, 0 isolated (`model.boundary`)."""
        return list(self.plan.alphas)

    @property
    def objectives(self) -> list[str]:
        """Each stage's head name (`model.objective`)."""
        return list(self.plan.objectives)

    @property
    def needs(self) -> frozenset[str]:
        """What the heads need from the data, together."""
        return self.plan.needs

    @property
    def views(self) -> int:
        """Images per sample the heads train on: 2 (stacked [view 1; view 2]) when a head contrasts views."""
        return self.plan.views

    def target_stages(self, stages: Sequence[int] | None) -> Sequence[int] | None:
        """Which of `stages` (None: all) need a reconstruction target: all of them when every head reconstructs."""
        targets = self.plan.target_stages
        if len(targets) == self.num_stages:
            return stages
        return [k for k in (range(self.num_stages) if stages is None else stages) if k in targets]

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
        return self.plan.isolated

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

    def prepare(self, images: Tensor, mask: Tensor | None = None, stages: Sequence[int] | None = None,
                labels: Tensor | None = None) -> Batch:
        """Targets and loss weights for every stage (or only for `stages`, None for the others: what a
        pipeline rank owns), and the token selection for the encoder. Only reconstructing (`mim`) stages
        get targets; when no head needs the mask the encoder sees every token, and `mask` may be None.
        `labels` (one per sample, i.e. per B / views images) are required when a head needs them.

        Made for the hot loop: no host sync. A host mask reaches the device with a non-blocking copy
        (Swin plans its windows from the host copy first); token selection is sized by the config's
        keep count, not read from the mask. Targets and weights are computed with autocast disabled,
        in fp32 whatever the caller's autocast (CUDA autocast would run the pixel target's einsum in bf16).
        """
        self.check_images(images)
        labels = as_labels(labels, images.shape[0], self.views) if "labels" in self.needs else None
        if mask is None:
            return self._prepare_unmasked(images, labels)
        self.check_mask(mask, images.shape[0])
        stages = self.target_stages(stages)
        host = mask if mask.device.type == "cpu" else None
        (mask,) = to_device([mask], images.device)
        with torch.autocast(images.device.type, enabled=False):
            targets = self.target_bank(images, stages)
            weights = [regrid(mask, self.mask_grid, t.out_grid / self.mask_grid) if target is not None else None
                       for t, target in zip(self.taps, targets)]
        if "mask" not in self.needs:  # no head reconstructs: the encoder reads whole images
            mask = host = None
        return Batch(self.family.context(self.cfg, mask, host), targets, weights, labels, self.views,
                     self._head_images(images))

    def _prepare_unmasked(self, images: Tensor, labels: Tensor | None) -> Batch:
        """`prepare` without a mask: whole images, which only heads that need no mask can train on."""
        if "mask" in self.needs or self.plan.target_stages:
            names = sorted({*self.plan.heads_needing("mask"), *self.plan.heads_needing("target")})
            raise ValueError(f"model.objective {' / '.join(names)} needs a mask: pass "
                             "one (model.random_mask(batch_size)); only a model whose heads need none runs without")
        none = [None] * self.num_stages
        return Batch(self.family.context(self.cfg, None, None), none, none, labels, self.views,
                     self._head_images(images))

    def _head_images(self, images: Tensor) -> Tensor | None:
        """The images the heads read (`HeadInputs.images`): only when a head needs them ("image")."""
        return images if "image" in self.needs else None

    def stage_step(self, k: int, x: Tensor, batch: Batch) -> tuple[Tensor, Tensor, Tensor, dict]:
        """Run stage k on its input: (output tokens, local loss, prediction, the head's logs). A
        reconstructing (`mim`) stage's head is its decoder (`predict`, compiled with the stage); any other
        reads the stage's normalized output."""
        stage = self.stages[k]
        x = stage(x, batch.ctx)
        if not self.plan.reconstructs(k):
            out = stage.head.loss(stage.features(x), HeadInputs(int(self.family.has_cls), batch.labels, batch.views,
                                                                batch.images))
            return x, out.loss, out.pred, out.logs
        pred = stage.predict(x, batch.ctx)
        return x, masked_mse(pred, batch.targets[k], batch.weights[k]), pred, {}

    def stages_of(self, x: Tensor, batch: Batch, stages: Sequence[int] | None = None, received: bool = False,
                  autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
                  ) -> Iterator[StageResult]:
        """The stage loop (`iter_stages`) over `stages` (None: all) from their first one's input `x`, each
        `stage_step` run under `autocast()`; `received`: that input came from another pipeline rank."""
        def run(k: int, x: Tensor) -> tuple[Tensor, Tensor, Tensor, dict]:
            with autocast():
                return self.stage_step(k, x, batch)

        return iter_stages(run, x, self.plan.alphas, range(self.num_stages) if stages is None else stages, received)

    def forward(self, images: Tensor, mask: Tensor | None = None, return_pred: bool = False,
                labels: Tensor | None = None) -> StageOutput:
        """Every stage's local loss on `images` under `mask` (None, or left out, when no head needs one)."""
        results = list(self.stages_of(images, self.prepare(images, mask, labels=labels)))
        losses = [r.loss for r in results]
        preds = [r.pred for r in results] if return_pred else None
        return StageOutput(torch.stack(losses).sum(), losses, mask, preds, [r.logs for r in results])

    @torch.no_grad()
    def after_optimizer_step(self, stages: Sequence[int] | None = None) -> None:
        """Each stage's head's `after_step` (of `stages`, None: all): every runner calls it once an
        optimizer step has updated those stages (e.g. `man`'s EMA of the next stage follows it)."""
        for k in range(self.num_stages) if stages is None else stages:
            if hasattr(self.stages[k], "head"):
                self.stages[k].head.after_step()

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


LocalMIM = StagewiseEncoder  # the former name (isolocal.LocalMIM), kept for existing code


def create_model(name: str, boundary: Boundary | None = None, **overrides: Any) -> StagewiseEncoder:
    """Build preset `name` (`isolocal.list_models()`), any ModelConfig field overridden (unknown fields are
    errors); `boundary`: "global", "isolated", an alpha in [0, 1], or one of those per boundary."""
    cfg = to_dict(preset_config(name))
    cfg.update(overrides)
    if boundary is not None:
        cfg["boundary"] = boundary
    return StagewiseEncoder(from_dict(ModelConfig, cfg))
