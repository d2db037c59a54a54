"""Encoders trained elsewhere, read for analysis; formats are told apart by keys, not file names.

- timm ViT state dict: timm parameter names at the top level (a DDP `module.` prefix is dropped);
- MAE: `{"model": timm-named encoder + decoder_* / mask_token}` (decoder ignored);
- published LocalMIM: `{"model": patch_embed.*, blocks.*, norm.<k>.*, decoder.*, hog_enc.*}`; the
  last tap's norm becomes timm's final `norm` (other tap norms, decoders and HOG layers are
  pre-training heads and are ignored).

timm models are built as `timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0,
**overrides)` with the overrides read off the tensor shapes, so nothing is ever downloaded.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
from torch import Tensor, nn

from isolocal.io.checkpoint import check_finite_weights

# num_heads of the standard ViT widths (Ti, S, B, L, H); other widths need an explicit hint.
STANDARD_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}
# Keys every timm-named ViT encoder has; their absence is what a wrong file is reported by.
REQUIRED_VIT_KEYS = ("patch_embed.proj.weight", "pos_embed", "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight")
# Pre-training heads and classifiers that an encoder does not need (MAE decoder, timm head).
_IGNORED_PREFIXES = ("decoder_", "mask_token", "head.")


def _describe(keys: Any) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:8]) + (f", ... ({len(keys)} keys)" if len(keys) > 8 else "")


def _from_localmim(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Published LocalMIM encoder keys -> timm keys: the last tap norm becomes timm's `norm`."""
    taps = sorted({int(m.group(1)) for k in sd if (m := re.match(r"norm\.(\d+)\.", k))})
    last = f"norm.{taps[-1]}."
    out = {}
    for key, value in sd.items():
        if key.startswith(("decoder.", "hog_enc.")) or (key.startswith("norm.") and not key.startswith(last)):
            continue
        out[key.replace(last, "norm.", 1) if key.startswith(last) else key] = value
    return out


def timm_vit_kwargs(sd: Mapping[str, Tensor], arch_hint: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`timm.create_model` overrides that rebuild the ViT a timm-named state dict came from.

    Read off the shapes: embed_dim, in_chans and patch size (patch projection), depth (block
    indices), img_size (position-embedding length minus the CLS row), mlp_ratio, qkv bias, q/k norm,
    LayerScale, and average pooling with `fc_norm` for fine-tuned MAE encoders. `num_heads` is
    not in any shape: it comes from `arch_hint` or the standard width table. `arch_hint` entries
    override anything inferred.
    """
    hint = dict(arch_hint or {})
    dim, in_chans, ph, pw = sd["patch_embed.proj.weight"].shape
    if ph != pw:
        raise ValueError(f"non-square patches {(ph, pw)} are not supported")
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    class_token = "cls_token" in sd
    patches = sd["pos_embed"].shape[1] - int(class_token)
    grid = round(patches**0.5)
    if grid * grid != patches:
        raise ValueError(f"pos_embed has {patches} patch positions, not a square grid")
    if "num_heads" not in hint and dim not in STANDARD_HEADS:
        raise ValueError(
            f"cannot infer num_heads for embed_dim {dim}; pass it (--heads N, or arch_hint={{'num_heads': N}}); "
            f"standard widths: {', '.join(f'{d}->{h}' for d, h in STANDARD_HEADS.items())}"
        )
    kwargs: dict[str, Any] = dict(
        img_size=grid * ph, patch_size=ph, in_chans=in_chans, embed_dim=dim, depth=depth,
        num_heads=STANDARD_HEADS.get(dim), mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / dim,
        qkv_bias="blocks.0.attn.qkv.bias" in sd, qk_norm="blocks.0.attn.q_norm.weight" in sd,
        class_token=class_token,
    )
    if "blocks.0.ls1.gamma" in sd:
        kwargs["init_values"] = 1.0  # any value creates LayerScale; the state dict sets gamma
    if "norm.weight" not in sd and "fc_norm.weight" in sd:
        kwargs.update(global_pool="avg", fc_norm=True)
    if not class_token:
        kwargs["global_pool"] = "avg"
    kwargs.update(hint)
    if not isinstance(kwargs["num_heads"], int) or kwargs["num_heads"] < 1 or dim % kwargs["num_heads"]:
        raise ValueError(f"num_heads {kwargs['num_heads']!r} must be a positive divisor of embed_dim {dim}")
    return kwargs


def timm_state_dict(obj: Any, path: Path) -> dict[str, Tensor]:
    """The timm-named encoder state dict inside a timm, MAE or published LocalMIM file's object."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict")
    inner = next((obj[k] for k in ("model", "state_dict") if isinstance(obj.get(k), Mapping)), obj)
    sd = {k.removeprefix("module."): v for k, v in inner.items()}  # DDP-saved state dicts prefix 'module.'
    if any(k.startswith("stages.") for k in sd):
        raise ValueError(f"{path}: isolocal StagewiseEncoder weights without their run config: missing keys ['config']")
    if any(re.match(r"norm\.\d+\.", k) for k in sd):
        sd = _from_localmim(sd)
    sd = {k: v for k, v in sd.items() if not k.startswith(_IGNORED_PREFIXES)}
    missing = [k for k in REQUIRED_VIT_KEYS if k not in sd]
    if missing:
        raise ValueError(
            f"{path} is not a ViT encoder checkpoint: missing keys {missing}. Expected an isolocal "
            "checkpoint ('model' + 'config'), a timm ViT state dict, an MAE checkpoint ('model' with "
            "timm names) or a LocalMIM checkpoint ('model' with patch_embed.*, blocks.*, norm.<k>.*); "
            f"found keys: {_describe(sd)}"
        )
    return sd


def build_timm_vit(sd: dict[str, Tensor], arch_hint: Mapping[str, Any] | None, path: Path) -> nn.Module:
    """The timm ViT `sd` came from (`timm_vit_kwargs`), its weights loaded and checked finite."""
    kwargs = timm_vit_kwargs(sd, arch_hint)
    check_finite_weights(sd, path)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, **kwargs)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} does not fit a timm ViT {kwargs}: missing keys {missing}, unexpected keys {unexpected}")
    return model
