"""Optional measurements during pre-training, made on the main rank and logged with the metrics:
per-layer NMI and attention distance on a fixed probe batch every `train.analysis_every` steps,
and online k-NN of every stage every `train.knn_every_epochs` epochs. Neither draws random numbers,
so a probed run trains exactly like an unprobed one."""
from __future__ import annotations

import torch

from analysis.tracking import AttentionTracker
from isolocal.config import RunConfig
from isolocal.eval.features import eval_datasets
from isolocal.eval.knn import online_knn
from isolocal.models.encoder import StagewiseEncoder

PROBE_IMAGES = 8


class Probes:
    def __init__(self, cfg: RunConfig, model: StagewiseEncoder):
        self.cfg = cfg
        self.train_ds, self.test_ds = eval_datasets(cfg, model.cfg)
        images = torch.stack([self.test_ds[i][0] for i in range(min(PROBE_IMAGES, len(self.test_ds)))])
        self.tracker = AttentionTracker(images, cfg.train.analysis_every)

    def after_step(self, step: int, model: StagewiseEncoder) -> dict | None:
        """{"kind": "analysis", ...} every `analysis_every` steps, else None."""
        metrics = self.tracker.maybe_log(step, model)
        return None if metrics is None else {"kind": "analysis", "step": step, **metrics}

    def after_epoch(self, epoch: int, model: StagewiseEncoder) -> dict | None:
        """{"kind": "knn", ...} every `knn_every_epochs` epochs, else None."""
        every = self.cfg.train.knn_every_epochs
        if not every or epoch % every:
            return None
        return {"kind": "knn", "epoch": epoch, **online_knn(model, self.train_ds, self.test_ds, self.cfg.eval)}
