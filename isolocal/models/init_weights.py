"""MAE's weight init, shared by the stage-wise encoder and the fresh layers a family copies for a head."""
from __future__ import annotations

from torch import nn


def mae_init(module: nn.Module) -> None:
    """MAE's init of one module (use with `Module.apply`): xavier-uniform linears, zero biases, unit
    LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
