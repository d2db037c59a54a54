"""`contrastive`: a per-stage projection head trained with InfoNCE between two augmented views
(SimCLR's NT-Xent, as in Greedy InfoMax / LoCo-style local contrastive learning).

The batch holds [view 1; view 2] (B = 2n): image i's positive is its other view, the other 2n - 2
images are its negatives. Negatives come from the batch the head sees: a data-parallel replica's or
a pipeline micro-batch's own, not gathered across processes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from isolocal.config import ModelConfig
from isolocal.config.head_options import option
from isolocal.heads.base import HeadInputs, HeadOutput, StageHead, mlp, pool

@dataclass
class ContrastiveOptions:
    """`[model.head_options.contrastive]`."""

    proj_dim: int = option(128, at_least=1)  # projection size
    temperature: float = option(0.1, above=0)  # InfoNCE temperature
    head_hidden: int = option(0, at_least=0)  # hidden width of the projection MLP; 0 = the stage's width


def similarities(z: Tensor, temperature: float) -> Tensor:
    """(m, m) cosine similarities / temperature of (m, d) projections, in fp32; -inf on the diagonal (an
    image is never its own positive or negative)."""
    z = F.normalize(z.float(), dim=1)
    sim = z @ z.T / temperature
    return sim.masked_fill(torch.eye(z.shape[0], dtype=torch.bool, device=z.device), float("-inf"))


def info_nce(z: Tensor, temperature: float) -> Tensor:
    """NT-Xent of (2n, d) projections [view 1; view 2]: cross-entropy of each row's cosine
    similarities / temperature (itself excluded) against the index of its other view."""
    n = z.shape[0] // 2
    positives = torch.arange(2 * n, device=z.device).roll(n)
    return F.cross_entropy(similarities(z, temperature), positives)


def supervised_nce(z: Tensor, labels: Tensor, temperature: float) -> Tensor:
    """The supervised contrastive loss as InfoPro writes it, over a batch of (m, d) projections: every
    ordered pair i != j of the same label is a positive,

        -1 / |P| * sum_{(i, j) in P} log(exp(s_ij) / sum_{k != i} exp(s_ik)),   s = cosine / temperature,

    0 when no two images share a label. With each image's other view as its only same-label image it is
    `info_nce`."""
    log_prob = similarities(z, temperature).log_softmax(dim=1)
    same = (labels[:, None] == labels[None, :]).fill_diagonal_(False)
    return -log_prob.masked_fill(~same, 0.0).sum() / same.sum().clamp(min=1)


class ContrastiveHead(StageHead):
    def __init__(self, dim: int, proj_dim: int, temperature: float, hidden: int = 0):
        super().__init__()
        self.proj = mlp(dim, hidden, proj_dim)
        self.temperature = temperature

    def loss(self, features: Tensor, inputs: HeadInputs) -> HeadOutput:
        if inputs.views != 2 or features.shape[0] % 2:
            raise ValueError(f"the contrastive head needs two views stacked along the batch, got views={inputs.views} "
                             f"and a batch of {features.shape[0]}")
        z = self.proj(pool(features, inputs.prefix))
        return HeadOutput(info_nce(z, self.temperature), z)


def build_contrastive(cfg: ModelConfig, dim: int, options: ContrastiveOptions) -> ContrastiveHead:
    return ContrastiveHead(dim, options.proj_dim, options.temperature, options.head_hidden)
