"""Optional measurements during pre-training, made on the main rank and logged with the metrics:
per-layer NMI and attention distance on a fixed probe batch every `train.analysis_every` steps,
and online k-NN of every stage on the validation split every `train.knn_every_epochs` epochs. Neither draws random numbers,
so a probed run trains exactly like an unprobed one."""
from __future__ import annotations

import torch

from analysis.tracking import AttentionTracker
from isolocal.config import RunConfig
from isolocal.eval.knn import online_knn
from isolocal.eval.splits import eval_splits
from isolocal.models.encoder import StagewiseEncoder

PROBE_IMAGES = 8


class Probes:
    def __init__(self, cfg: RunConfig, model: StagewiseEncoder):
        self.cfg = cfg
        splits = eval_splits(cfg, model.cfg)
        self.train_ds, self.val_ds = splits.train, splits.val()
        # the attention probe batch: test images, read for analysis only (no number of a claim comes from it)
        test = splits.test()
        images = torch.stack([test[i][0] for i in range(min(PROBE_IMAGES, len(test)))])
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
        return {"kind": "knn", "epoch": epoch, **online_knn(model, self.train_ds, self.val_ds, self.cfg.eval)}
