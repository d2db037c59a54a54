"""Load encoders and images for attention analysis, whatever checkpoint format people have.

Checkpoint formats are told apart by their keys, not by file names:

- isolocal: ``{"model": LocalMIM state dict, "config": RunConfig dict}`` (or a pipeline checkpoint
  directory) -> ``LocalMIM`` through ``isolocal.load_checkpoint``.
- timm ViT state dict: timm parameter names at the top level -> timm ``VisionTransformer``.
- MAE: ``{"model": timm-named encoder + decoder_* / mask_token}`` -> timm ViT (decoder ignored).
- published LocalMIM: ``{"model": patch_embed.*, blocks.*, norm.<k>.*, decoder.*, hog_enc.*}`` ->
  timm ViT whose final ``norm`` is the last tap's norm (other tap norms, decoders and HOG layers
  are pre-training heads and are ignored).

timm models are built as ``timm.create_model("vit_base_patch16_224", pretrained=False,
num_classes=0, **overrides)`` with the overrides read off the tensor shapes, so nothing is ever
downloaded. timm-named formats are ViTs; isolocal checkpoints may also hold a Swin encoder.
"""

from __future__ import annotations

import argparse
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from PIL import Image
from timm.layers import PatchEmbed
from timm.models.swin_transformer import SwinTransformerBlock
from torch import Tensor, nn
from torchvision.transforms.v2.functional import pil_to_tensor

import isolocal
from analysis.capture import TokenLayout, is_windowed, token_layout
from isolocal.data import (
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    FashionMNIST,
    build_transform,
)

# num_heads of the standard ViT widths (Ti, S, B, L, H); other widths need an explicit hint.
STANDARD_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}
# Keys every timm-named ViT encoder has; their absence is what a wrong file is reported by.
REQUIRED_VIT_KEYS = ("patch_embed.proj.weight", "pos_embed", "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight")
# Pre-training heads and classifiers that analysis does not need (MAE decoder, timm head).
_IGNORED_PREFIXES = ("decoder_", "mask_token", "head.")
# Bundled scikit-image photos (no download); gray ones are replicated for RGB models.
SKIMAGE_PHOTOS = (
    "astronaut", "brick", "camera", "cat", "chelsea", "clock", "coffee", "coins", "grass", "gravel",
    "hubble_deep_field", "immunohistochemistry", "moon", "rocket",
)
IMAGE_SPEC_HELP = "fmnist:<test indices, e.g. 0,5,17> | skimage:<names, e.g. astronaut,coffee> | <image folder>"


def _read(path: Path) -> Any:
    """The file's object; pickled argparse Namespaces (MAE/LocalMIM 'args') are allowed, code is not."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    try:  # mmap (zip-format files): telling formats apart does not read every tensor
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as err:  # torch raises UnpicklingError, RuntimeError or EOFError by cause
        raise ValueError(f"cannot read {path} as a torch checkpoint: {err}") from None


def _describe(keys: Any) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:8]) + (f", ... ({len(keys)} keys)" if len(keys) > 8 else "")


def _strip_module_prefix(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """DDP-saved state dicts prefix every key with 'module.'."""
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _from_localmim(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Published LocalMIM encoder keys -> timm keys: the last tap norm becomes timm's ``norm``."""
    taps = sorted({int(m.group(1)) for k in sd if (m := re.match(r"norm\.(\d+)\.", k))})
    last = f"norm.{taps[-1]}."
    out = {}
    for key, value in sd.items():
        if key.startswith(("decoder.", "hog_enc.")) or (key.startswith("norm.") and not key.startswith(last)):
            continue
        out[key.replace(last, "norm.", 1) if key.startswith(last) else key] = value
    return out


def timm_vit_kwargs(sd: Mapping[str, Tensor], arch_hint: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``timm.create_model`` overrides that rebuild the ViT a timm-named state dict came from.

    Read off the shapes: embed_dim, in_chans and patch size (patch projection), depth (block
    indices), img_size (position-embedding length minus the CLS row), mlp_ratio, qkv bias, q/k norm,
    LayerScale, and average pooling with ``fc_norm`` for fine-tuned MAE encoders. ``num_heads`` is
    not in any shape: it comes from ``arch_hint`` or the standard width table. ``arch_hint`` entries
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


def _timm_state_dict(obj: Any, path: Path) -> dict[str, Tensor]:
    """The timm-named encoder state dict inside a timm, MAE or published LocalMIM file."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict")
    inner = next((obj[k] for k in ("model", "state_dict") if isinstance(obj.get(k), Mapping)), obj)
    sd = _strip_module_prefix(inner)
    if any(k.startswith("stages.") for k in sd):
        raise ValueError(f"{path}: isolocal LocalMIM weights without their run config: missing keys ['config']")
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


def _build_timm(sd: dict[str, Tensor], arch_hint: Mapping[str, Any] | None, path: Path) -> nn.Module:
    kwargs = timm_vit_kwargs(sd, arch_hint)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, **kwargs)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} does not fit a timm ViT {kwargs}: missing keys {missing}, unexpected keys {unexpected}")
    return model


def load_for_analysis(path: str | Path, arch_hint: Mapping[str, Any] | None = None) -> tuple[nn.Module, TokenLayout]:
    """(encoder in eval mode, its input token layout at its own image size) from any supported file.

    Swin encoders (isolocal checkpoints) load too; their per-layer window layouts come from
    ``analysis.attention_layouts``.

    ``arch_hint`` holds ``timm.create_model`` overrides for timm-named formats, chiefly
    ``{"num_heads": N}`` for non-standard widths; isolocal checkpoints carry their own config and
    ignore it.
    """
    path = Path(path)
    obj = None if path.is_dir() else _read(path)  # a directory can only be an isolocal (pipeline) checkpoint
    if obj is None or (isinstance(obj, Mapping) and "config" in obj and isinstance(obj.get("model"), Mapping)):
        model = isolocal.load_checkpoint(path)
    else:
        model = _build_timm(_timm_state_dict(obj, path), arch_hint, path)
    size, _ = input_shape(model)
    return model.eval(), token_layout(model, (size, size))


def input_shape(model: nn.Module) -> tuple[int, int]:
    """(img_size, in_chans) the encoder's patch embedding was built for."""
    embed = next((m for m in model.modules() if isinstance(m, PatchEmbed)), None)
    if embed is None or embed.img_size is None:
        raise ValueError("model has no timm PatchEmbed with a fixed image size")
    h, w = embed.img_size
    if h != w:
        raise ValueError(f"non-square image size {(h, w)} is not supported")
    return h, embed.proj.in_channels


def encoder_depth(model: nn.Module) -> int:
    """Number of encoder blocks, i.e. the layers capture numbers 1..depth."""
    if is_windowed(model):
        return sum(isinstance(m, SwinTransformerBlock) for m in model.modules())
    return model.cfg.depth if isinstance(model, isolocal.LocalMIM) else len(model.blocks)


@dataclass(frozen=True)
class ImageBatch:
    """Normalized images (B, C, H, W), a short name per image, and the normalization used."""

    images: Tensor
    names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]


def _parse_list(spec: str, body: str) -> list[str]:
    items = [s.strip() for s in body.split(",") if s.strip()]
    if not items:
        raise ValueError(f"--images {spec!r} names no images; use {IMAGE_SPEC_HELP}")
    return items


def _raw_images(spec: str) -> list[tuple[str, Any]]:
    """(name, PIL image or uint8 (C, H, W) tensor) per image of ``spec``; all names checked first."""
    if spec.startswith("fmnist:"):
        items = _parse_list(spec, spec.removeprefix("fmnist:"))
        bad = [s for s in items if not s.isdigit()]
        if bad:
            raise ValueError(f"--images {spec!r}: {bad} are not Fashion-MNIST test indices (integers 0..9999)")
        data = FashionMNIST(train=False)
        out_of_range = [int(s) for s in items if int(s) >= len(data)]
        if out_of_range:
            raise ValueError(f"--images {spec!r}: indices {out_of_range} out of range 0..{len(data) - 1}")
        return [(f"fmnist_{s}", data[int(s)][0]) for s in items]
    if spec.startswith("skimage:"):
        import skimage.data

        items = _parse_list(spec, spec.removeprefix("skimage:"))
        bad = [s for s in items if s not in SKIMAGE_PHOTOS]
        if bad:
            raise ValueError(f"--images {spec!r}: unknown scikit-image photos {bad}; valid: {', '.join(SKIMAGE_PHOTOS)}")
        arrays = [torch.from_numpy(getattr(skimage.data, s)()) for s in items]
        return [(s, a.permute(2, 0, 1) if a.dim() == 3 else a[None]) for s, a in zip(items, arrays)]
    folder = Path(spec)
    if not folder.is_dir():
        raise ValueError(f"--images {spec!r} is not a known image source; use {IMAGE_SPEC_HELP}")
    extensions = {e for e, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in extensions)
    if not files:
        raise ValueError(f"image folder {folder} holds no image files ({', '.join(sorted(extensions)[:6])}, ...)")
    out = []
    for file in files:
        try:
            with Image.open(file) as img:
                out.append((file.stem, pil_to_tensor(img.convert("RGB"))))
        except OSError as err:
            raise ValueError(f"cannot read image {file}: {err}") from None
    return out


def load_images(spec: str, img_size: int, in_chans: int) -> ImageBatch:
    """Images for analysis from ``spec`` (see ``IMAGE_SPEC_HELP``), resized and center-cropped to
    ``img_size``, brought to ``in_chans`` and normalized with Fashion-MNIST statistics for
    1-channel models and ImageNet's for 3-channel ones (what those models were trained on)."""
    stats = {1: (FASHION_MNIST_MEAN, FASHION_MNIST_STD), 3: (IMAGENET_MEAN, IMAGENET_STD)}
    if in_chans not in stats:
        raise ValueError(f"in_chans must be 1 or 3 for analysis images, got {in_chans}")
    mean, std = stats[in_chans]
    transform = build_transform(img_size, in_chans, mean, std, train=False)
    raw = _raw_images(spec)
    return ImageBatch(torch.stack([transform(img) for _, img in raw]), [n for n, _ in raw], mean, std)
