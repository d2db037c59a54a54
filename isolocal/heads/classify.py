"""`classify`: a supervised auxiliary classifier per stage, as in DGL and InfoPro.

Pooled tokens -> a two-layer MLP -> cross-entropy on the labels. A stage that outputs a feature map
(ResNet) gets DGL / InfoPro's auxiliary net instead: a 3x3 conv-BN-ReLU at the stage's width, then
the pooling and the MLP, so even a one-block stage's head has a spatial layer of its own. The
stage's top classifier is also the end-to-end supervised baseline: one stage, global backprop.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from timm.layers import ConvNormAct
from torch import Tensor

from isolocal.config import ModelConfig
from isolocal.config.head_options import option
from isolocal.heads.base import HeadInputs, HeadOutput, StageHead, mlp, pool


@dataclass
class ClassifyOptions:
    """`[model.head_options.classify]`."""

    num_classes: int = option(10, at_least=2)  # at least the data's classes (checked before a run)
    head_hidden: int = option(0, at_least=0)  # hidden width of the MLP; 0 = the stage's width


class Classifier(StageHead):
    """A head whose `logits(features, prefix)` are class scores, trained by cross-entropy on the labels
    (`classify`, `dgl`, `auglocal`); `name` is the head's, for the message when labels are missing."""

    name = "classify"

    def loss(self, features: Tensor, inputs: HeadInputs) -> HeadOutput:
        if inputs.labels is None:
            raise ValueError(f"the {self.name} head needs labels: pass labels= (one class index per sample)")
        logits = self.logits(features, inputs.prefix)
        return HeadOutput(F.cross_entropy(logits.float(), inputs.labels), logits,
                          {"acc": (logits.argmax(1) == inputs.labels).float().mean()})  # argmax: no graph


class ClassifyHead(Classifier):
    def __init__(self, dim: int, num_classes: int, hidden: int = 0, spatial: bool = False):
        super().__init__()
        if spatial:  # feature maps (B, dim, H, W): a conv before the pooling
            self.conv = ConvNormAct(dim, dim, 3)
        self.spatial = spatial
        self.mlp = mlp(dim, hidden, num_classes)

    def logits(self, features: Tensor, prefix: int) -> Tensor:
        """(B, num_classes) class scores of a stage's output (`prefix` leading non-grid tokens)."""
        if self.spatial:
            features = self.conv(features)
        return self.mlp(pool(features, prefix))


def build_classify(cfg: ModelConfig, dim: int, options: ClassifyOptions) -> ClassifyHead:
    return ClassifyHead(dim, options.num_classes, options.head_hidden, spatial=cfg.arch == "resnet")  # maps, not tokens
