"""Checkpoints and exports: isolocal's own formats (`checkpoint`), encoders trained elsewhere
(`foreign`), the one model loader over both (`load`: `load_model`, `seeded_init`), the export to timm
(`export`), where a command may write (`paths`)."""
