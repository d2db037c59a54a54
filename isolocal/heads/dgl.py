"""`dgl`: the auxiliary classifier of Decoupled Greedy Learning (Belilovsky, Eickenberg & Oyallon, ICML 2020).

Stage k's output h_k (a ResNet map, or transformer tokens folded back onto their patch grid, see
`isolocal.heads.grid`) is average-pooled to a `pooled` x `pooled` map (2 x 2, the paper's spatial
reduction), flattened and classified by an MLP of `mlp_layers` linear layers with ReLU between:

    L_k = CE(MLP_k(flatten(avgpool_{2x2}(h_k))), y)

`convs` > 0 puts that many 3x3 conv-BN-ReLU layers at the stage's width before the pooling, the paper's
CNN auxiliary net; 0 (the default) is the pooled-MLP one.

Where it departs from the paper: the MLP's hidden width is the stage's (`head_hidden` 0) unless set; the
top stage is trained through its auxiliary net like every other (the paper's last module ends in the
network's own classifier, which the top stage's dgl head plays here); DGL's asynchronous variant
(a replay buffer between modules) is not a head: isolated boundaries give its synchronous form.
Tokens need the whole grid ("grid"), so a model whose other heads need a mask (`mim`) is refused.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import torch.nn.functional as F
from timm.layers import ConvNormAct
from torch import Tensor, nn

from isolocal.config import ModelConfig
from isolocal.config.head_options import option
from isolocal.heads.classify import Classifier
from isolocal.heads.grid import as_map


@dataclass
class DGLOptions:
    """`[model.head_options.dgl]`."""

    num_classes: int = option(10, at_least=2)  # at least the data's classes (checked before a run)
    head_hidden: int = option(0, at_least=0)  # hidden width of the MLP; 0 = the stage's width
    pooled: int = option(2, at_least=1)  # side of the average-pooled map the MLP reads
    mlp_layers: int = option(3, at_least=1)  # linear layers of the MLP (1: a linear classifier)
    convs: int = option(0, at_least=0)  # 3x3 conv-BN-ReLU layers before the pooling (the CNN auxiliary net)


def relu_mlp(widths: list[int]) -> nn.Sequential:
    """Linear layers from widths[0] to widths[-1], ReLU between them."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(pairwise(widths)):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)


class DGLHead(Classifier):
    name = "dgl"

    def __init__(self, dim: int, options: DGLOptions):
        super().__init__()
        self.convs = nn.Sequential(*[ConvNormAct(dim, dim, 3) for _ in range(options.convs)])
        self.pooled = options.pooled
        hidden = options.head_hidden or dim
        self.mlp = relu_mlp([dim * options.pooled ** 2, *[hidden] * (options.mlp_layers - 1), options.num_classes])

    def logits(self, features: Tensor, prefix: int) -> Tensor:
        """(B, num_classes) class scores of a stage's output (`prefix` leading non-grid tokens)."""
        maps = self.convs(as_map(features, prefix, "dgl"))
        return self.mlp(F.adaptive_avg_pool2d(maps, self.pooled).flatten(1))


def build_dgl(cfg: ModelConfig, dim: int, options: DGLOptions) -> DGLHead:
    return DGLHead(dim, options)
