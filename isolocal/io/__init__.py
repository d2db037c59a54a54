"""Checkpoints and exports: isolocal's own formats (`checkpoint`), encoders trained elsewhere
(`foreign`), the one model loader over both (`load`), the export to timm (`export`)."""
from isolocal.io.load import load_model, seeded_init

__all__ = ["load_model", "seeded_init"]
