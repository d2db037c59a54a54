"""`man`: the momentum auxiliary network of Su et al., "Momentum Auxiliary Network for Supervised Local
Learning" (ECCV 2024), a plug-in on another supervised head (`head`: `dgl` by default, `classify`,
`infopro`).

Stage k's auxiliary net runs the stage's output through the next stage's layers twice over: an
exponential moving average (EMA) of their live parameters, which no loss trains, and the paper's learnable
bias, a trainable network of the same architecture (fresh layers, `ModelView.copy_layers`) whose output is
added; the sum feeds a head of type `head` built as for the next stage (its width, its depth), trained by
this stage's loss:

    L_k = L_head(EMA_{k+1}(h_k) + B_k(h_k), y)
    after every optimizer step:  theta_EMA <- m * theta_EMA + (1 - m) * theta_{k+1}

The EMA starts as a copy of the next stage at initialisation and follows it after every optimizer step,
momentum m = `momentum` (the authors' model default 0.999; 1 keeps the initial copy). BatchNorm's
running statistics of the copy follow the live ones by the same average; in training the copy normalizes
by the batch's statistics, as the stage it copies does, and its forward leaves its own statistics alone,
so the copy changes only by the EMA update. Only stage k's parameters, its bias network and its head are
trained by L_k: the copy's parameters require no gradient and the next stage's live layers are never run
by this head. The last stage has no next one: its loss is its own `head`'s, L_{K-1} = L_head(h_{K-1}, y).

Where it departs from the paper's code: the EMA follows the live layers after each optimizer step (the
authors' code updates it inside the forward, before the step) and starts equal to them (theirs starts from
an independent random init, like their bias network); the head after the sum is any of the shipped
supervised heads, its options from its own table (`[model.head_options.dgl]`, ...). On ViT the copies read
the stage's normalized tokens (what every head reads), not the un-normalized stream the next stage reads.

The EMA reads the next stage's live parameters (the need "next_stage"), which a pipeline rank does not
hold when the next stage trains on another rank, so a pipeline is refused before any work; Swin, whose
blocks need their stage's window plan (`ctx`), offers neither the live layers nor copies and is refused by
name.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from isolocal.config import ModelConfig
from isolocal.config.head_options import option
from isolocal.heads.base import HEADS, HeadInputs, HeadOutput, ModelView, StageHead

INNER_HEADS = ("classify", "dgl", "infopro")  # supervised heads whose net reads the sum


@dataclass
class MANOptions:
    """`[model.head_options.man]`."""

    head: str = option("dgl", one_of=INNER_HEADS)  # the head after the sum (its options: its own table)
    momentum: float = option(0.999, at_least=0, at_most=1)  # m of the EMA


class MANHead(StageHead):
    """Made by `bind`, when the next stage exists: `ema` (frozen), `bias` (trained) and `inner`, the head."""

    def __init__(self, cfg: ModelConfig, dim: int, options: MANOptions):
        super().__init__()
        self.cfg, self.dim, self.options = cfg, dim, options
        self._next: tuple[nn.Module, ...] = ()  # the next stage's live layers; a tuple keeps them out of this module

    def bind(self, view: ModelView) -> None:
        inner = HEADS[self.options.head]
        if view.stage == view.num_stages - 1:
            self.inner = inner.make(self.cfg, self.dim, view.stage)
            return
        live = view.next_stage()
        self._next = (live,)
        self.ema = copy.deepcopy(live).requires_grad_(False)
        self.bias, width = view.copy_layers(view.stage_layers[view.stage + 1])
        self.inner = inner.make(self.cfg, width, view.stage + 1)

    def auxiliary(self, features: Tensor) -> Tensor:
        """EMA_{k+1}(h) + B_k(h); h itself on the last stage. The EMA's forward runs on copies of its buffers,
        so BatchNorm's running statistics change only by the EMA update."""
        if not self._next:
            return features
        buffers = {name: b.clone() for name, b in self.ema.named_buffers()}
        return functional_call(self.ema, buffers, (features,)) + self.bias(features)

    @property
    def logits(self) -> Callable[[Tensor, int], Tensor] | None:
        """The head's class scores on the auxiliary net's output, `logits(features, prefix)`, when its head
        predicts classes (None for `infopro`'s contrastive task)."""
        scores = getattr(self.inner, "logits", None)
        return None if scores is None else lambda features, prefix: scores(self.auxiliary(features), prefix)

    def loss(self, features: Tensor, inputs: HeadInputs) -> HeadOutput:
        return self.inner.loss(self.auxiliary(features), inputs)

    @torch.no_grad()
    def after_step(self) -> None:
        """theta_EMA <- m * theta_EMA + (1 - m) * theta_live, floating buffers too; counters are copied."""
        if not self._next:
            return
        m = self.options.momentum
        live = dict(self._next[0].named_parameters()) | dict(self._next[0].named_buffers())
        for name, average in [*self.ema.named_parameters(), *self.ema.named_buffers()]:
            if average.is_floating_point():
                average.mul_(m).add_(live[name], alpha=1 - m)
            else:
                average.copy_(live[name])


def build_man(cfg: ModelConfig, dim: int, options: MANOptions) -> MANHead:
    return MANHead(cfg, dim, options)
