"""Per-stage features of a frozen encoder on full, unmasked images: what k-NN and linear probes read.

Every stage's tap-normalized tokens (`model.encode`) are pooled to one vector per image, either the
CLS token or the mean of the patch tokens, so each stage gets its own feature matrix and its own
accuracy.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from isolocal.core.progress import progress_bar
from isolocal.config import EvalConfig
from isolocal.heads.base import pool
from isolocal.models.family import check_feature


@contextlib.contextmanager
def cuda_eval_precision(device: torch.device, autocast: bool = True) -> Iterator[None]:
    """On CUDA: TF32 for fp32 matmuls and convolutions, and (with `autocast`) bf16 autocast; elsewhere
    nothing changes, so CPU results stay bit-identical.

    Evaluation reads features and logits, not fp32 rounding: plain fp32 on a GPU only costs time.
    The matmul precision is process-wide, so it is restored on exit.
    """
    if device.type != "cuda":
        yield
        return
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            yield
    finally:
        torch.set_float32_matmul_precision(previous)


def pool_tokens(tokens: Tensor, feature: str, has_cls: bool) -> Tensor:
    """(B, N, D) tokens -> (B, D): the CLS token, or the mean of the patch tokens (CLS excluded); a
    (B, D, H, W) feature map -> its mean over H, W."""
    check_feature(feature, has_cls)
    if feature == "cls":
        return tokens[:, 0]
    return pool(tokens, int(has_cls))


def model_device(model: nn.Module) -> torch.device:
    """Where a model's tensors live: its first parameter's device, or its first buffer's for a model
    without parameters (the raw-pixel floor)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


@torch.no_grad()
def extract_features(
    model: nn.Module,
    dataset: Dataset,
    feature: str = "cls",
    batch_size: int = 256,
    num_workers: int = 0,
    desc: str = "features",
    progress: bool = True,
) -> tuple[list[Tensor], Tensor]:
    """(one (N, D_k) float32 matrix per stage, (N,) labels), both on the model's device.

    On CUDA the encoder runs in bf16 autocast with TF32 (`cuda_eval_precision`); tokens are pooled
    and stored in fp32. The model runs in eval mode (no drop path) and is put back in its previous
    mode afterwards, so the trainer can call this between epochs.
    """
    check_feature(feature, model.family.has_cls)
    device = model_device(model)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=torch.cuda.is_available())
    was_training = model.training
    model.eval()
    feats: list[list[Tensor]] = [[] for _ in range(model.num_stages)]
    labels: list[Tensor] = []
    try:
        for images, targets in progress_bar(loader, desc=desc, disable=not progress, leave=False):
            with cuda_eval_precision(device):
                tokens = model.encode(images.to(device, non_blocking=True))
            for k, t in enumerate(tokens):
                feats[k].append(pool_tokens(t.float(), feature, model.family.has_cls))
            labels.append(torch.as_tensor(targets).to(device, non_blocking=True))
    finally:
        model.train(was_training)
    return [torch.cat(f) for f in feats], torch.cat(labels)


@dataclass
class SplitFeatures:
    """One split's per-stage feature matrices (N, D_k), extracted once for k-NN and probes, and its labels."""

    stages: list[Tensor]
    labels: Tensor


def split_features(model: nn.Module, dataset: Dataset, cfg: EvalConfig, num_workers: int = 0,
                   progress: bool = True, desc: str = "features") -> SplitFeatures:
    """`extract_features` with the eval config's pooling and batch size."""
    stages, labels = extract_features(model, dataset, cfg.feature, cfg.linear_batch_size, num_workers, desc, progress)
    return SplitFeatures(stages, labels)
