"""Losses and layers written out by hand, the references tests compare the heads' computations with."""
from __future__ import annotations

import torch
from torch import nn


def ce_by_hand(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """-log(exp(l_y) / sum_c exp(l_c)), averaged."""
    picked = logits[torch.arange(len(labels)), labels]
    return (torch.log(torch.exp(logits).sum(1)) - picked).mean()


def bn_by_hand(x: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    """Training-mode batch norm: the batch's mean and biased variance per channel, then `bn`'s affine."""
    mean, var = x.mean((0, 2, 3), keepdim=True), x.var((0, 2, 3), unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)


def bn_relu_by_hand(x: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    """Training-mode batch norm and ReLU."""
    return bn_by_hand(x, bn).clamp(min=0)
