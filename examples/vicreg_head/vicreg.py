"""A VICReg-style local head (Bardes, Ponce & LeCun, 2022), written outside isolocal as a user would.

Each stage pools its output, projects it and trains on VICReg's three terms between the two augmented
views of every image: invariance (the views' projections agree), variance (every projected dimension
keeps a standard deviation of at least 1 over the batch) and covariance (the dimensions decorrelate).
Its options are set in `[model.head_options.vicreg]`; it logs each term per stage.

    isolocal pretrain --import examples/vicreg_head/vicreg.py --set model.objective=vicreg
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from isolocal.config import ModelConfig
from isolocal.heads import HeadInputs, HeadOutput, StageHead, option, pool, register_head


@dataclass
class VicregOptions:
    """`[model.head_options.vicreg]`: the projector's width and the weight of each term (VICReg's defaults)."""

    proj_dim: int = option(256, at_least=1)
    inv_weight: float = option(25.0, at_least=0)
    var_weight: float = option(25.0, at_least=0)
    cov_weight: float = option(1.0, at_least=0)

    def __post_init__(self) -> None:
        if self.inv_weight + self.var_weight + self.cov_weight == 0:
            raise ValueError("inv_weight, var_weight and cov_weight are all 0: the head would learn nothing")


def variance_term(z: Tensor) -> Tensor:
    """How far each dimension's standard deviation over the batch falls below 1, averaged."""
    return F.relu(1 - torch.sqrt(z.var(dim=0) + 1e-4)).mean()


def covariance_term(z: Tensor) -> Tensor:
    """The squared off-diagonal covariances of the batch's dimensions, summed, over the dimension count."""
    cov = torch.cov(z.T)
    return (cov.pow(2).sum() - cov.diagonal().pow(2).sum()) / z.shape[1]


class VicregHead(StageHead):
    def __init__(self, dim: int, options: VicregOptions):
        super().__init__()
        self.options = options
        width = options.proj_dim
        self.proj = nn.Sequential(nn.Linear(dim, width), nn.GELU(), nn.Linear(width, width))

    def loss(self, features: Tensor, inputs: HeadInputs) -> HeadOutput:
        if inputs.views != 2:
            raise ValueError(f"the vicreg head needs two views stacked along the batch, got views={inputs.views}")
        z = self.proj(pool(features, inputs.prefix)).float()
        z1, z2 = z.chunk(2)  # the batch is [view 1 of every image; view 2 of every image]
        invariance = F.mse_loss(z1, z2)
        variance = (variance_term(z1) + variance_term(z2)) / 2
        covariance = covariance_term(z1) + covariance_term(z2)
        o = self.options
        loss = o.inv_weight * invariance + o.var_weight * variance + o.cov_weight * covariance
        return HeadOutput(loss, z, {"invariance": invariance, "variance": variance, "covariance": covariance})


def build(cfg: ModelConfig, dim: int, options: VicregOptions) -> VicregHead:
    """One stage's head: `dim` is the stage's width (tokens or feature maps alike, `pool` reads both)."""
    return VicregHead(dim, options)


register_head("vicreg", {"views"}, build, options=VicregOptions)
