"""Analysis of MIM encoders: attention (capture, NMI, distance, figures) and per-stage reconstructions."""

from analysis.capture import TokenLayout, attention_layouts, capture_attention, token_layout
from analysis.figures import plot_attention_maps, plot_metric_vs_depth
from analysis.measure import measure_attention
from analysis.metrics import attention_distance, layer_table, layout_table, nmi
from analysis.reconstruction import StageReconstruction, reconstruct
from analysis.reconstruction_figure import save_reconstruction

__all__ = [
    "StageReconstruction",
    "TokenLayout",
    "attention_distance",
    "attention_layouts",
    "capture_attention",
    "layer_table",
    "layout_table",
    "measure_attention",
    "nmi",
    "plot_attention_maps",
    "plot_metric_vs_depth",
    "reconstruct",
    "save_reconstruction",
    "token_layout",
]
