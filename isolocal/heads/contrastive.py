"""`contrastive`: a per-stage projection head trained with InfoNCE between two augmented views
(SimCLR's NT-Xent, as in Greedy InfoMax / LoCo-style local contrastive learning).

The batch holds [view 1; view 2] (B = 2n): image i's positive is its other view, the other 2n - 2
images are its negatives. Negatives come from the batch the head sees: a data-parallel replica's or
a pipeline micro-batch's own, not gathered across processes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from isolocal.config import ModelConfig
from isolocal.heads.base import HeadInputs, HeadOutput, StageHead, mlp, pool


def info_nce(z: Tensor, temperature: float) -> Tensor:
    """NT-Xent of (2n, d) projections [view 1; view 2]: cross-entropy of each row's cosine
    similarities / temperature (itself excluded) against the index of its other view."""
    n = z.shape[0] // 2
    z = F.normalize(z.float(), dim=1)
    sim = z @ z.T / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    positives = torch.arange(2 * n, device=z.device).roll(n)
    return F.cross_entropy(sim, positives)


class ContrastiveHead(StageHead):
    needs = frozenset({"views"})

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


def build_contrastive(cfg: ModelConfig, dim: int) -> ContrastiveHead:
    return ContrastiveHead(dim, cfg.proj_dim, cfg.temperature, cfg.head_hidden)
