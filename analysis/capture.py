"""Capture post-softmax self-attention from timm-style encoders.

timm's ``Attention`` uses fused scaled-dot-product kernels that never materialize the attention
matrix, so hooking a dropout module or reading an intermediate is not possible. Instead a forward
hook records each attention module's input and the attention is recomputed afterwards from the
module's own ``qkv`` projection and q/k norms, as softmax(q k^T * scale) in fp32 (METHOD.md
section 8). This works whether ``fused_attn`` is on or off and on any module built from timm
``Block``s (plain timm ViTs and the isolocal stage-split encoder alike).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from timm.layers import Attention, PatchEmbed
from torch import Tensor, nn

Runner = Callable[[nn.Module, Tensor], object]


@dataclass(frozen=True)
class TokenLayout:
    """How a token sequence maps onto the image: prefix (CLS) tokens, then a row-major grid."""

    num_prefix_tokens: int
    grid: tuple[int, int]
    patch: tuple[int, int]


def default_runner(model: nn.Module, images: Tensor) -> object:
    """Run the encoder on full images: isolocal models expose ``encode``, timm ViTs ``forward_features``."""
    if hasattr(model, "encode"):
        return model.encode(images)
    return model.forward_features(images)


def token_layout(model: nn.Module, image_size: tuple[int, int]) -> TokenLayout:
    """Token layout of ``model`` for images of ``image_size`` (H, W).

    The prefix count is timm's ``num_prefix_tokens`` when present, else 1 (one CLS token). The
    patch size comes from the first timm ``PatchEmbed`` in the model, so it also holds for the
    stage-split encoder whose first stage owns the patch embedding.
    """
    embed = next((m for m in model.modules() if isinstance(m, PatchEmbed)), None)
    if embed is None:
        raise ValueError("model has no timm PatchEmbed; cannot derive the token grid")
    ph, pw = embed.patch_size
    h, w = image_size
    if h % ph or w % pw:
        raise ValueError(f"image size {image_size} is not a multiple of the patch size {(ph, pw)}")
    return TokenLayout(int(getattr(model, "num_prefix_tokens", 1)), (h // ph, w // pw), (ph, pw))


def attention_probs(attn: Attention, x: Tensor) -> Tensor:
    """Recompute softmax(q k^T * scale) of a timm ``Attention`` for its input ``x`` (B, N, C).

    The projection runs in the module's parameter dtype with autocast off, so the result does not
    depend on the caller's autocast context; logits and softmax are fp32.
    """
    b, n, _ = x.shape
    with torch.autocast(x.device.type, enabled=False):
        qkv = attn.qkv(x.to(attn.qkv.weight.dtype))
        qkv = qkv.reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
        logits = (q.float() @ k.float().transpose(-2, -1)) * attn.scale
        return logits.softmax(dim=-1)


@torch.no_grad()
def capture_attention(
    model: nn.Module,
    images: Tensor,
    layers: Sequence[int] | None = None,
    runner: Runner = default_runner,
) -> list[Tensor]:
    """Per-layer post-softmax attention (B, heads, N, N), fp32, of ``model`` on full ``images``.

    Layers are the timm ``Attention`` modules that run during ``runner(model, images)``, numbered
    from 1 in module order (modules that do not run, e.g. decoders under ``encode``, are skipped).
    ``layers`` selects 1-based layer numbers (default: all). The model runs in eval mode, so
    dropout and drop-path do not perturb later layers; its training flag is restored afterwards.
    """
    modules = [m for m in model.modules() if isinstance(m, Attention)]
    if not modules:
        raise ValueError("model contains no timm.layers.Attention modules")
    inputs: dict[int, Tensor] = {}

    def record(index: int) -> Callable:
        def hook(module: Attention, args: tuple, kwargs: dict, output: Tensor) -> None:
            if kwargs.get("attn_mask") is not None or kwargs.get("is_causal", False):
                raise ValueError("capture_attention expects unmasked, non-causal self-attention")
            if index in inputs:
                raise ValueError(f"attention module {index} ran twice in one forward")
            inputs[index] = (args[0] if args else kwargs["x"]).detach()

        return hook

    handles = [m.register_forward_hook(record(i), with_kwargs=True) for i, m in enumerate(modules)]
    was_training = model.training
    model.eval()
    try:
        runner(model, images)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()

    ran = sorted(inputs)
    if not ran:
        raise ValueError("no attention module ran during the forward; check the runner")
    chosen = range(1, len(ran) + 1) if layers is None else layers
    for layer in chosen:
        if not 1 <= layer <= len(ran):
            raise ValueError(f"layer {layer} out of range 1..{len(ran)}")
    return [attention_probs(modules[ran[layer - 1]], inputs[ran[layer - 1]]) for layer in chosen]
