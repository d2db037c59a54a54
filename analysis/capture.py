"""Capture post-softmax self-attention from timm-style encoders.

timm's ``Attention`` uses fused scaled-dot-product kernels that never materialize the attention
matrix, so hooking a dropout module or reading an intermediate is not possible. Instead a forward
hook records each attention module's input and the attention is recomputed afterwards from the
module's own ``qkv`` projection and q/k norms, as softmax(q k^T * scale) in fp32 (docs/method.md
§8). This works whether ``fused_attn`` is on or off and on any module built from timm
``Block``s (plain timm ViTs and the isolocal stage-split encoder alike).

Swin (timm ``WindowAttention``, also inside isolocal's Swin on full images) attends within windows
only, so its attention is captured per window: softmax(q k^T * scale + relative position bias +
region mask) with one row per (image, window) of timm's partition. For shifted windows that is the
cyclically shifted grid, where timm's region mask (-100) leaves ~0 weight between the parts of a
window that wraps around the border. Each window is then treated as an image of w x w tokens
without CLS (``attention_layouts``), so NMI and attention distance are computed within each
(shifted) window and averaged over windows and images.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from timm.layers import Attention, PatchEmbed
from timm.models.swin_transformer import SwinTransformerBlock, WindowAttention
from torch import Tensor, nn

from isolocal.models.encoder import StagewiseEncoder

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

    The prefix count is timm's ``num_prefix_tokens`` when present, else 0 for Swin (no CLS) and 1
    (one CLS token) otherwise. The patch size comes from the first timm ``PatchEmbed`` in the model,
    so it also holds for the stage-split encoder whose first stage owns the patch embedding.
    """
    embed = next((m for m in model.modules() if isinstance(m, PatchEmbed)), None)
    if embed is None:
        raise ValueError("model has no timm PatchEmbed; cannot derive the token grid")
    ph, pw = embed.patch_size
    h, w = image_size
    if h % ph or w % pw:
        raise ValueError(f"image size {image_size} is not a multiple of the patch size {(ph, pw)}")
    prefix = getattr(model, "num_prefix_tokens", 0 if is_windowed(model) else 1)
    return TokenLayout(int(prefix), (h // ph, w // pw), (ph, pw))


def _swin_blocks(model: nn.Module) -> list[SwinTransformerBlock]:
    return [m for m in model.modules() if isinstance(m, SwinTransformerBlock)]


def is_windowed(model: nn.Module) -> bool:
    """True for Swin-style encoders, whose attention is captured per window, not over the image."""
    return bool(_swin_blocks(model))


def encoder_depth(model: nn.Module) -> int:
    """Number of encoder blocks, i.e. the layers capture numbers 1..depth."""
    if is_windowed(model):
        return len(_swin_blocks(model))
    return model.cfg.depth if isinstance(model, StagewiseEncoder) else len(model.blocks)


def attention_layouts(model: nn.Module, image_size: tuple[int, int], num_layers: int) -> list[TokenLayout]:
    """Layout of each of the ``num_layers`` layers ``capture_attention`` returns for an encoder.

    ViT: every layer has the model's ``token_layout``. Swin: layer i is the i-th Swin block, whose
    captured "images" are its w x w windows: no prefix tokens, grid (w, w), and a patch of
    image_size / block resolution pixels (4, 8, 16, 32 px at 224 px for Swin-B).
    """
    blocks = _swin_blocks(model)
    if not blocks:
        return [token_layout(model, image_size)] * num_layers
    if len(blocks) != num_layers:
        raise ValueError(f"{num_layers} captured layers but the model has {len(blocks)} Swin blocks")
    h, w = image_size
    return [
        TokenLayout(0, tuple(b.window_size), (h // b.input_resolution[0], w // b.input_resolution[1]))
        for b in blocks
    ]


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


def window_attention_probs(attn: WindowAttention, x: Tensor, mask: Tensor | None) -> Tensor:
    """Recompute a timm ``WindowAttention``'s softmax for windows ``x`` (B * windows, w*w, C):
    q k^T * scale + relative position bias + the shifted-window region mask, in fp32."""
    b, n, _ = x.shape
    with torch.autocast(x.device.type, enabled=False):
        qkv = attn.qkv(x.to(attn.qkv.weight.dtype)).reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        logits = (qkv[0].float() @ qkv[1].float().transpose(-2, -1)) * attn.scale
        bias = attn.relative_position_bias_table[attn.relative_position_index.view(-1)]
        logits = logits + bias.view(n, n, -1).permute(2, 0, 1).float()
        if mask is not None:
            windows = mask.shape[0]
            logits = logits.view(-1, windows, attn.num_heads, n, n) + mask.float().view(1, windows, 1, n, n)
            logits = logits.view(b, attn.num_heads, n, n)
        return logits.softmax(dim=-1)


@torch.no_grad()
def capture_attention(
    model: nn.Module,
    images: Tensor,
    layers: Sequence[int] | None = None,
    runner: Runner = default_runner,
) -> list[Tensor]:
    """Per-layer post-softmax attention (B, heads, N, N), fp32, of ``model`` on full ``images``.

    For Swin blocks a layer is (B * windows, heads, w*w, w*w), one row per window (module docstring).
    Layers are the timm ``Attention`` / ``WindowAttention`` modules that run during
    ``runner(model, images)``, numbered from 1 in module order (modules that do not run, e.g.
    decoders under ``encode``, are skipped).
    ``layers`` selects 1-based layer numbers (default: all). The model runs in eval mode, so
    dropout and drop-path do not perturb later layers; its training flag is restored afterwards.
    """
    modules = [m for m in model.modules() if isinstance(m, (Attention, WindowAttention))]
    if not modules:
        raise ValueError("model contains no timm Attention or WindowAttention modules")
    inputs: dict[int, tuple[Tensor, Tensor | None]] = {}

    def record(index: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> None:
            # Attention's attn_mask or WindowAttention's shifted-window region mask.
            extra = kwargs.get("mask", kwargs.get("attn_mask", args[1] if len(args) > 1 else None))
            if isinstance(module, Attention) and (extra is not None or kwargs.get("is_causal", False)):
                raise ValueError("capture_attention expects unmasked, non-causal self-attention")
            if index in inputs:
                raise ValueError(f"attention module {index} ran twice in one forward")
            inputs[index] = ((args[0] if args else kwargs["x"]).detach(), extra)

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
    out = []
    for layer in chosen:
        module, (x, extra) = modules[ran[layer - 1]], inputs[ran[layer - 1]]
        if isinstance(module, WindowAttention):
            out.append(window_attention_probs(module, x, extra))
        else:
            out.append(attention_probs(module, x))
    return out
