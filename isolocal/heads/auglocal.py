"""`auglocal`: AugLocal's augmented auxiliary network (Ma, Wu, Tang, Zhang & Zhou, "Scaling Supervised Local
Learning with Augmented Auxiliary Networks", ICLR 2024).

Stage k's auxiliary net is built from a uniform sample of the backbone's *later* layers (those of stages
k+1 .. K-1), as fresh copies of their architecture (`ModelView.copy_layers`: parameters of its own, trained
by this stage's loss only, never shared with the layers they copy), then global average pooling and a linear
classifier:

    L_k = CE(W_k pool(A_k(h_k)), y),    A_k = copies of layers s_1 < ... < s_{d_k} after stage k

- The pyramidal depth rule, with d = `depth` and tau = `depth_decay` (the paper's default ratio 0.5):
  d_k = max(1, round(d - tau * (d - 1) * k / (K - 2))) for the stages k = 0 .. K - 2 (d_0 = d for K = 2),
  falling linearly from d at stage 0 towards (1 - tau) * d + tau at stage K - 2; the last stage has no later
  layers, d_{K-1} = 0 (its net is the pooling and the classifier, the paper's network's own classifier);
  round() rounds halves up.
- The uniform sample: with l the stage's last layer and n the number of layers after it, the d_k layers
  l + round(i * n / d_k) for i = 1 .. d_k (halves up), the last of them the backbone's last layer; all n
  when d_k >= n.
- The copies are `width` x as wide as the layers they copy (1, the authors' default, keeps their widths).
  ResNet: residual blocks of the backbone's type, each halving the resolution at most once to follow the
  backbone's downsampling; ViT: transformer blocks reading the stage's normalized tokens (a linear map first
  when `width` < 1), a LayerNorm, and the mean over the patch tokens.

Where it departs from the paper: its layers are the backbone's blocks (the stem belongs to stage 0, so the
authors' ResNet-32 layer count of 16 is 15 blocks here); the authors' code puts a BatchNorm before the
classifier when an aux net has at most one layer, which this head does not; halves round up (the authors'
Python `round` rounds them to even). `depth` defaults to 2, their README's ResNet-32 command. The head builds
its copies in `bind`, from the config, so it runs unchanged in a pipeline; on Swin, whose blocks need the
window plan of their stage's context (`ctx`), which a head does not get, the family offers no copies and the
model is refused in one line naming it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor, nn

from isolocal.config import ModelConfig
from isolocal.config.head_options import option
from isolocal.heads.base import ModelView, pool
from isolocal.heads.classify import Classifier


@dataclass
class AugLocalOptions:
    """`[model.head_options.auglocal]`."""

    num_classes: int = option(10, at_least=2)  # at least the data's classes (checked before a run)
    depth: int = option(2, at_least=1)  # d: layers copied into stage 0's auxiliary net
    depth_decay: float = option(0.5, at_least=0, at_most=1)  # tau: how far the depth falls towards 1 by stage K - 2
    width: float = option(1.0, above=0, at_most=1)  # the copies' width, relative to the layers they copy


def pyramid_depth(depth: int, decay: float, stage: int, stages: int) -> int:
    """d_k, the layers copied for stage `stage` of `stages` (see the module docstring)."""
    if not 0 <= stage < stages:
        raise ValueError(f"stage must be in [0, {stages - 1}], got {stage}")
    if stage == stages - 1:
        return 0
    if stages == 2:
        return depth
    return max(1, math.floor(depth - decay * (depth - 1) * stage / (stages - 2) + 0.5))


def uniform_sample(later: range, count: int) -> list[int]:
    """`count` of the `later` layers, evenly spaced and ending with the last one (all of them when `count`
    reaches their number): l + round(i * n / count), i = 1 .. count, halves up (l: the layer before them)."""
    n = len(later)
    if count >= n:
        return list(later)
    return [later.start - 1 + (2 * i * n + count) // (2 * count) for i in range(1, count + 1)]


class AugLocalHead(Classifier):
    """Its auxiliary net (`layers`, `classifier`) is made by `bind`, when the model's later layers are known."""

    name = "auglocal"

    def __init__(self, dim: int, options: AugLocalOptions):
        super().__init__()
        self.dim, self.options = dim, options
        self.copied: list[int] = []  # the backbone layers the auxiliary net copies

    def bind(self, view: ModelView) -> None:
        o = self.options
        self.copied = uniform_sample(view.later_layers, pyramid_depth(o.depth, o.depth_decay, view.stage,
                                                                       view.num_stages))
        self.layers, width = view.copy_layers(self.copied, o.width) if self.copied else (nn.Identity(), self.dim)
        self.classifier = nn.Linear(width, o.num_classes)

    def logits(self, features: Tensor, prefix: int) -> Tensor:
        """(B, num_classes) class scores of a stage's output (`prefix` leading non-grid tokens)."""
        return self.classifier(pool(self.layers(features), prefix))


def build_auglocal(cfg: ModelConfig, dim: int, options: AugLocalOptions) -> AugLocalHead:
    return AugLocalHead(dim, options)
