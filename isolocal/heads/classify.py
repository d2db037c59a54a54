"""`classify`: a supervised auxiliary classifier per stage, as in DGL and InfoPro.

Pooled tokens (or the pooled feature map) -> a two-layer MLP -> cross-entropy on the labels. The
stage's top classifier is also the end-to-end supervised baseline: one stage, global backprop.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from isolocal.config import ModelConfig
from isolocal.heads.base import HeadInputs, HeadOutput, StageHead, mlp, pool


class ClassifyHead(StageHead):
    needs = frozenset({"labels"})

    def __init__(self, dim: int, num_classes: int, hidden: int = 0):
        super().__init__()
        self.mlp = mlp(dim, hidden, num_classes)

    def logits(self, features: Tensor, prefix: int) -> Tensor:
        """(B, num_classes) class scores of a stage's output (`prefix` leading non-grid tokens)."""
        return self.mlp(pool(features, prefix))

    def loss(self, features: Tensor, inputs: HeadInputs) -> HeadOutput:
        if inputs.labels is None:
            raise ValueError("the classify head needs labels: pass labels= (one class index per sample)")
        logits = self.logits(features, inputs.prefix)
        return HeadOutput(F.cross_entropy(logits.float(), inputs.labels), logits,
                          {"acc": (logits.argmax(1) == inputs.labels).float().mean().detach()})


def build_classify(cfg: ModelConfig, dim: int) -> ClassifyHead:
    return ClassifyHead(dim, cfg.num_classes, cfg.head_hidden)
