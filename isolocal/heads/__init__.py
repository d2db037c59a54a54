"""Local objectives as plug-ins: the stage-head contract (`base`), its registry, the shipped heads, and
the per-stage plan a model resolves once from its config (`plan`).

- `mim`: LocalMIM's decoder (HOG or pixels), built by the model family, masked-cell MSE;
- `classify`: pooled features -> MLP -> cross-entropy (`classify`);
- `contrastive`: pooled features -> projection -> InfoNCE between two views (`contrastive`).

Heads of one's own register in their own module, which a run imports in each of its processes (`imports` /
`--import`), or in an installed package's `isolocal.heads` entry point (`base.find_head`).
"""
from __future__ import annotations

from isolocal.heads.base import (HEADS, NEEDS, HeadInputs, HeadOutput, HeadType, StageHead, parse_objectives, pool,
                                 register_head)
from isolocal.heads.classify import ClassifyHead, build_classify
from isolocal.heads.contrastive import ContrastiveHead, build_contrastive, info_nce
from isolocal.heads.plan import StagePlan

register_head("mim", frozenset({"target", "mask"}), None)
register_head("classify", ClassifyHead.needs, build_classify)
register_head("contrastive", ContrastiveHead.needs, build_contrastive)

__all__ = ["HEADS", "NEEDS", "ClassifyHead", "ContrastiveHead", "HeadInputs", "HeadOutput", "HeadType", "StageHead",
           "StagePlan", "info_nce", "parse_objectives", "pool", "register_head"]
