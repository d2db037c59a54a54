"""Attention metrics of a model on images in one call: capture, token layouts, the per-layer table.

What `isolocal analyze nmi|distance`, a study run's `analysis.csv` and the training-time tracker
report, so the three give the same numbers for the same model and images.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
from torch import Tensor, nn

from analysis.capture import attention_layouts, capture_attention, encoder_depth
from analysis.metrics import layout_table


def measure_attention(model: nn.Module, images: Tensor, layers: Sequence[int] | None = None) -> pd.DataFrame:
    """One row per layer (1-based ``layer``; ``layers`` selects, default all): head-mean ``nmi`` and
    ``attention_distance`` (pixels; Swin: within windows, see ``analysis.capture``) and their per-head
    lists ``nmi_heads`` and ``attention_distance_heads``. ``images`` are normalized (B, C, H, W) as the
    model trains on; they go to the model's device. DDP / DeepSpeed wrappers are unwrapped via
    ``.module``. Runs in eval mode under no_grad and draws no random numbers."""
    model = getattr(model, "module", model)
    images = images.to(next(model.parameters()).device)
    attn = capture_attention(model, images, layers)
    chosen = list(range(1, len(attn) + 1)) if layers is None else list(layers)
    every = attention_layouts(model, tuple(images.shape[-2:]), encoder_depth(model))
    return layout_table(attn, [every[i - 1] for i in chosen]).assign(layer=chosen)
