"""`infopro`: the InfoPro loss of Wang, Ni, Song, Yang & Huang, "Revisiting Locally Supervised Learning"
(ICLR 2021), as its surrogate: a task term that keeps what predicts the label plus a reconstruction term
that keeps what describes the image, weighted by the stage's depth.

    L_k = w_task(k) * L_task(h_k, y) + w_rec(k) * MSE(D_k(h_k), x)

- L_task, `task = "ce"`: cross-entropy of an auxiliary classifier on h_k (the `classify` head's net: on
  a ResNet map a 3x3 conv-BN-ReLU, then pooling and a two-layer MLP; on tokens pooling and the MLP);
  `task = "contrastive"`: the paper's supervised contrastive loss (`supervised_nce`: same-label images
  of the batch are positives) on a `proj_dim` projection by the same net;
- D_k, the decoder: h_k (tokens folded back onto their patch grid, `isolocal.heads.grid`) upsampled
  bilinearly to the image size, a 3x3 conv-BN-ReLU of `decoder_width` channels and a 3x3 conv to the
  image's channels; x is the input image as the encoder reads it, normalized by the data's mean and std;
- w_task, w_rec: linear in depth, from (`task_weight_first`, `recon_weight_first`) = (0, 1) at stage 0 to
  (`task_weight_last`, `recon_weight_last`) = (1, 0) at the last stage K - 1, w(k) = first + k / (K - 1)
  * (last - first); a one-stage model takes the last values.

Where it departs from the paper: the reconstruction is an MSE on the normalized image (the paper's
code compares a sigmoid output to the image in [0, 1] by binary cross-entropy); the weight schedule is
the linear one above, an option set, where the authors' published commands set `--ixx_1 5 --ixy_1 0.5
--ixx_2 0 --ixy_2 0` (reconstruction weight 5 and task weight 0.5 at the first module, both falling to 0
towards the last one, which their network's own classifier trains; every stage here is trained by its
head, the top one by its task term); `decoder_width` (12) and `temperature` (0.07) are this head's
choices. The contrastive form's positives are the batch's same-label images, as in the paper, so it needs
labels and one view (not `contrastive`'s two augmented views). Tokens need the whole grid ("grid"), so a
model whose other heads need a mask (`mim`) is refused.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn.functional as F
from timm.layers import ConvNormAct
from torch import Tensor, nn

from isolocal.config import ModelConfig
from isolocal.config.head_options import option
from isolocal.heads.base import HeadInputs, HeadOutput, StageHead
from isolocal.heads.classify import ClassifyHead
from isolocal.heads.contrastive import supervised_nce
from isolocal.heads.grid import as_map


@dataclass
class InfoProOptions:
    """`[model.head_options.infopro]`."""

    task: str = option("ce", one_of=("ce", "contrastive"))  # the task term: cross-entropy or supervised contrastive
    num_classes: int = option(10, at_least=2)  # at least the data's classes (checked before a run)
    head_hidden: int = option(0, at_least=0)  # hidden width of the task net's MLP; 0 = the stage's width
    proj_dim: int = option(128, at_least=1)  # projection size (task "contrastive")
    temperature: float = option(0.07, above=0)  # contrastive temperature (task "contrastive")
    decoder_width: int = option(12, at_least=1)  # channels of the decoder's hidden conv
    task_weight_first: float = option(0.0, at_least=0)  # w_task at stage 0
    task_weight_last: float = option(1.0, at_least=0)  # w_task at the last stage
    recon_weight_first: float = option(1.0, at_least=0)  # w_rec at stage 0
    recon_weight_last: float = option(0.0, at_least=0)  # w_rec at the last stage

    def __post_init__(self) -> None:
        for end in ("first", "last"):  # both ends > 0: by linearity every stage between is, too
            if getattr(self, f"task_weight_{end}") + getattr(self, f"recon_weight_{end}") == 0:
                raise ValueError(f"task_weight_{end} and recon_weight_{end} are both 0: the {end} stage would "
                                 "learn nothing")

    def weights(self, stage: int, stages: int) -> tuple[float, float]:
        """(w_task, w_rec) of stage `stage` of `stages`: linear from the first values to the last."""
        if not 0 <= stage < stages:
            raise ValueError(f"stage must be in [0, {stages - 1}], got {stage}")
        t = stage / (stages - 1) if stages > 1 else 1.0
        return (self.task_weight_first + t * (self.task_weight_last - self.task_weight_first),
                self.recon_weight_first + t * (self.recon_weight_last - self.recon_weight_first))


class ImageDecoder(nn.Module):
    """InfoPro's decoder: a map upsampled bilinearly to the image's size, a 3x3 conv-BN-ReLU, a 3x3 conv to
    the image's channels."""

    def __init__(self, dim: int, width: int, in_chans: int):
        super().__init__()
        self.conv = ConvNormAct(dim, width, 3)
        self.out = nn.Conv2d(width, in_chans, 3, padding=1)

    def forward(self, maps: Tensor, size: tuple[int, int]) -> Tensor:
        return self.out(self.conv(F.interpolate(maps, size=size, mode="bilinear", align_corners=False)))


class InfoProHead(StageHead):
    def __init__(self, dim: int, in_chans: int, options: InfoProOptions, stage: int, stages: int,
                 spatial: bool = False):
        super().__init__()
        self.task = options.task
        self.temperature = options.temperature
        self.task_weight, self.recon_weight = options.weights(stage, stages)
        out = options.num_classes if self.task == "ce" else options.proj_dim
        self.task_net = ClassifyHead(dim, out, options.head_hidden, spatial)  # its `logits` are projections too
        self.decoder = ImageDecoder(dim, options.decoder_width, in_chans)

    @property
    def logits(self) -> Callable[[Tensor, int], Tensor] | None:
        """The task net's class scores, `logits(features, prefix)`, for the task "ce"; None for "contrastive",
        whose outputs are projections (`isolocal eval head` scores only heads that predict classes)."""
        return self.task_net.logits if self.task == "ce" else None

    def loss(self, features: Tensor, inputs: HeadInputs) -> HeadOutput:
        if inputs.labels is None or inputs.images is None:
            raise ValueError("the infopro head needs labels and the input images: pass labels= (one class index "
                             "per sample); the model passes the images it encodes")
        out = self.task_net.logits(features, inputs.prefix)
        if self.task == "ce":
            task = F.cross_entropy(out.float(), inputs.labels)
            logs = {"acc": (out.argmax(1) == inputs.labels).float().mean()}  # argmax: no graph
        else:
            task, logs = supervised_nce(out, inputs.labels, self.temperature), {}
        images = inputs.images
        recon = F.mse_loss(self.decoder(as_map(features, inputs.prefix, "infopro"), images.shape[-2:]).float(),
                           images.float())
        loss = self.task_weight * task + self.recon_weight * recon  # both terms always: every weight gets a grad
        return HeadOutput(loss, out, {**logs, "task": task.detach(), "recon": recon.detach()})


def build_infopro(cfg: ModelConfig, dim: int, options: InfoProOptions, stage: int) -> InfoProHead:
    """Stage `stage`'s head: its weights from its depth among the model's `len(cfg.taps)` stages."""
    return InfoProHead(dim, cfg.in_chans, options, stage, len(cfg.taps), spatial=cfg.arch == "resnet")
