"""Analysis of MIM encoders: attention (capture, NMI, distance, figures) and per-stage reconstructions.

The names below are imported on first use (PEP 562): `import analysis` alone imports nothing heavy.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    "StageReconstruction": "analysis.reconstruction",
    "TokenLayout": "analysis.capture",
    "attention_distance": "analysis.metrics",
    "attention_layouts": "analysis.capture",
    "capture_attention": "analysis.capture",
    "layer_table": "analysis.metrics",
    "layout_table": "analysis.metrics",
    "measure_attention": "analysis.measure",
    "nmi": "analysis.metrics",
    "plot_attention_maps": "analysis.figures",
    "plot_metric_vs_depth": "analysis.figures",
    "reconstruct": "analysis.reconstruction",
    "save_reconstruction": "analysis.reconstruction_figure",
    "token_layout": "analysis.capture",
}
__all__ = [  # = sorted(_EXPORTS)
    "StageReconstruction", "TokenLayout", "attention_distance", "attention_layouts", "capture_attention",
    "layer_table", "layout_table", "measure_attention", "nmi", "plot_attention_maps", "plot_metric_vs_depth",
    "reconstruct", "save_reconstruction", "token_layout",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'analysis' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # the next access is a plain lookup
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # what the names are, for type checkers and editors
    from analysis.capture import TokenLayout, attention_layouts, capture_attention, token_layout
    from analysis.figures import plot_attention_maps, plot_metric_vs_depth
    from analysis.measure import measure_attention
    from analysis.metrics import attention_distance, layer_table, layout_table, nmi
    from analysis.reconstruction import StageReconstruction, reconstruct
    from analysis.reconstruction_figure import save_reconstruction
