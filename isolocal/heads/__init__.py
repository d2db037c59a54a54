"""Local objectives as plug-ins: the stage-head contract (`base`), its registry, the shipped heads, and
the per-stage plan a model resolves once from its config (`plan`).

- `mim`: LocalMIM's decoder (HOG or pixels), built by the model family, masked-cell MSE (its settings are
  the family's `decoder_*`, `target` and `scales` fields);
- `classify`: pooled features -> MLP -> cross-entropy (`classify`; options `num_classes`, `head_hidden`);
- `contrastive`: pooled features -> projection -> InfoNCE between two views (`contrastive`; options
  `proj_dim`, `temperature`, `head_hidden`);
- `dgl`: DGL's auxiliary net, features pooled to 2x2 -> MLP -> cross-entropy (`dgl`; options `num_classes`,
  `head_hidden`, `pooled`, `mlp_layers`, `convs`);
- `infopro`: InfoPro's loss, a task term (cross-entropy or supervised contrastive) plus a reconstruction
  of the input image, weighted by the stage's depth (`infopro`; options `task`, the weights' ends, ...);
- `auglocal`: AugLocal's auxiliary net, fresh copies of a uniform sample of the backbone's later layers
  (fewer for deeper stages), pooling, a linear classifier, cross-entropy (`auglocal`; options
  `num_classes`, `depth`, `depth_decay`, `width`);
- `man`: the momentum auxiliary network, an EMA of the next stage's layers plus a trainable bias network
  of their architecture, feeding a supervised head (`man`; options `head`, `momentum`).

The last two read the model beyond their stage through `StageHead.bind` and a `ModelView` (`base`).

docs/heads.md describes each, with its options and cost.

Heads of one's own register in their own module (`register_head`, which documents the contract; options
with `option`), which a run imports in each of its processes (`imports` / `--import`), or in an installed
package's `isolocal.heads` entry point (`base.find_head`). docs/extending.md works one through.
"""
from __future__ import annotations

from isolocal.config.head_options import option
from isolocal.heads.auglocal import AugLocalHead, AugLocalOptions, build_auglocal
from isolocal.heads.base import (HEADS, NEEDS, HeadInputs, HeadOutput, HeadType, ModelView, StageHead,
                                 parse_objectives, pool, register_head)
from isolocal.heads.classify import ClassifyHead, ClassifyOptions, build_classify
from isolocal.heads.contrastive import ContrastiveHead, ContrastiveOptions, build_contrastive, info_nce, supervised_nce
from isolocal.heads.dgl import DGLHead, DGLOptions, build_dgl
from isolocal.heads.infopro import InfoProHead, InfoProOptions, build_infopro
from isolocal.heads.man import MANHead, MANOptions, build_man
from isolocal.heads.plan import StagePlan

register_head("mim", {"target", "mask"}, None)
register_head("classify", {"labels"}, build_classify, options=ClassifyOptions)
register_head("contrastive", {"views"}, build_contrastive, options=ContrastiveOptions)
register_head("dgl", {"labels", "grid"}, build_dgl, options=DGLOptions)
register_head("infopro", {"labels", "image", "grid"}, build_infopro, options=InfoProOptions)
register_head("auglocal", {"labels"}, build_auglocal, options=AugLocalOptions)
register_head("man", {"labels", "image", "grid", "next_stage"}, build_man, options=MANOptions)

__all__ = ["HEADS", "NEEDS", "AugLocalHead", "AugLocalOptions", "ClassifyHead", "ClassifyOptions", "ContrastiveHead",
           "ContrastiveOptions", "DGLHead", "DGLOptions", "HeadInputs", "HeadOutput", "HeadType", "InfoProHead",
           "InfoProOptions", "MANHead", "MANOptions", "ModelView", "StageHead", "StagePlan", "info_nce", "option",
           "parse_objectives", "pool", "register_head", "supervised_nce"]
