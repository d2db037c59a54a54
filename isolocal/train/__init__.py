"""Pre-training: the shared loop (`loop`), the single-process / data-parallel trainer, optimizers, logs.

`pretrain(cfg)` is the entry every caller uses: the trainer, or with `pipeline.stages` > 0 the
DeepSpeed pipeline runner (`isolocal.train.pipeline.runner`), which runs the same loop.
"""
from __future__ import annotations

from isolocal.config import RunConfig
from isolocal.train.trainer import Trainer, train


def pretrain(cfg: RunConfig, resume: bool = False, init: str | None = None) -> dict:
    """Pre-train `cfg`: resume its run directory, or start from checkpoint `init`'s weights (any
    isolocal checkpoint or run directory). Returns the run's summary (every rank of a pipeline gets
    one, with its `rank`)."""
    if resume and init is not None:
        raise ValueError("--resume continues a run from its own checkpoint; --init starts a new run from "
                         "another one's weights: pass one of them")
    if cfg.pipeline.stages > 0:
        from isolocal.train.pipeline.runner import pretrain_pipeline

        return pretrain_pipeline(cfg, resume=resume, init=init)
    return train(cfg, resume=resume, init=init)


__all__ = ["Trainer", "pretrain", "train"]
