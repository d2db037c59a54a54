"""Attention analysis of MIM encoders (METHOD.md section 8): capture, NMI, distance, figures."""

from analysis.capture import TokenLayout, attention_layouts, capture_attention, token_layout
from analysis.figures import plot_attention_maps, plot_metric_vs_depth
from analysis.metrics import attention_distance, layer_table, layout_table, nmi

__all__ = [
    "TokenLayout",
    "attention_distance",
    "attention_layouts",
    "capture_attention",
    "layer_table",
    "layout_table",
    "nmi",
    "plot_attention_maps",
    "plot_metric_vs_depth",
    "token_layout",
]
