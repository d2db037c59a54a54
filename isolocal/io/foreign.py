"""Models trained elsewhere; formats are told apart by keys, not file names.

As encoders (timm ViTs, for analysis):
- timm ViT state dict: timm parameter names at the top level (a DDP `module.` prefix is dropped);
- MAE: `{"model": timm-named encoder + decoder_* / mask_token}` (decoder ignored);
- published LocalMIM ViT: `{"model": patch_embed.*, cls_token, pos_embed, blocks.*, norm.<k>.*, decoder.<k>.*,
  hog_enc.<k>.*, "args": Namespace}`; the last tap's norm becomes timm's final `norm` (other tap norms,
  decoders and HOG layers are pre-training heads and are ignored).

Whole, decoders included: a published LocalMIM ViT or Swin file as a `StagewiseEncoder` of a given
config (`published_model`; docs/method.md §9): encoder entries renamed into stages (a Swin file's patch
mergings regrouped to standard Swin's neighbour order), each decoder permuted to isolocal's
position-table layout (`load_published_decoder`), the HOG layers checked and their offsets kept
(`hog_bias`). A published Swin file:
`{"model": encoder.patch_embed.*, encoder.layers.<s>.{blocks,downsample}.*, encoder.norm.<k>.*, decoder.<k>.*,
hog_enc.<k>.*, "args": Namespace}`.

timm models are built as `timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0,
**overrides)` with the overrides read off the tensor shapes, so nothing is ever downloaded.
"""
from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from torch import Tensor, nn

from isolocal.config import ModelConfig
from isolocal.core.targets import hog_kernels
from isolocal.io.checkpoint import check_finite_weights, check_fits
from isolocal.models.decoder import load_published_decoder, published_decoder_entry
from isolocal.models.encoder import StagewiseEncoder
from isolocal.models.family import per_tap
from isolocal.models.swin import merge_weight_from_published

# num_heads of the standard ViT widths (Ti, S, B, L, H); other widths need an explicit hint.
STANDARD_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}
# Keys every timm-named ViT encoder has; their absence is what a wrong file is reported by.
REQUIRED_VIT_KEYS = ("patch_embed.proj.weight", "pos_embed", "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight")
# Pre-training heads and classifiers that an encoder does not need (MAE decoder, timm head).
_IGNORED_PREFIXES = ("decoder_", "mask_token", "head.")
# Entries of a published LocalMIM file. ViT: a tap's LayerNorm, an encoder block. Swin: a tap's LayerNorm, a
# Swin stage's entry (its blocks, the patch merging after it). Both: one of the decoders, a HOG layer.
_TAP_NORM = re.compile(r"norm\.(\d+)\.(.+)")
_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")
_SWIN_TAP_NORM = re.compile(r"encoder\.norm\.(\d+)\.(.+)")
_SWIN_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)")
_DECODER = re.compile(r"decoder\.(\d+)\.(.+)")
_HOG_LAYER = re.compile(r"hog_enc\.(\d+)\.conv\.(weight|bias)")
# Where those land in a StagewiseEncoder: a Swin patch merging's weights, a Swin block's relative position
# index (a buffer the published code saves and timm rebuilds).
_MERGE_WEIGHT = re.compile(r"stages\.\d+\.layers\.\d+\.downsample\.(.+)")
_RELATIVE_INDEX = ".attn.relative_position_index"


def _published_vit(dim: int, depth: int, heads: int, patch: int) -> dict[str, Any]:
    """What the published code fixes for every ViT besides the weights' shapes: taps after blocks 2, 4,
    depth-2 and depth, and 8 heads in every decoder."""
    return {"embed_dim": dim, "depth": depth, "num_heads": heads, "patch_size": patch,
            "taps": [1, 3, depth - 3, depth - 1], "decoder_heads": [8] * 4}


# The published pre-training models (`--model`), as the ModelConfig fields no weight shape shows (attention
# heads, taps) and the ones beside them. MIM_vit_huge_patch14 is left out: its x4 tap has no whole-pixel cell.
PUBLISHED_VITS = {
    "MIM_vit_small_patch16": _published_vit(384, 12, 6, 16),
    "MIM_vit_base_patch16": _published_vit(768, 12, 12, 16),
    "MIM_vit_large_patch16": _published_vit(1024, 24, 16, 16),
}


def _published_swin(dim: int, heads: list[int], window: int) -> dict[str, Any]:
    """What the published code fixes for every Swin besides the width, heads and window: Swin-B/L's depths,
    patch 4, a tap after every Swin stage, 4 heads in every decoder, every LayerNorm at eps 1e-6."""
    return {"embed_dim": dim, "depths": [2, 2, 18, 2], "stage_heads": heads, "patch_size": 4, "window_size": window,
            "taps": [0, 1, 2, 3], "decoder_heads": [4] * 4, "swin_norm_eps": 1e-6}


# The published Swin pre-training models (`--model`); there is no Swin-T or Swin-S among them.
PUBLISHED_SWINS = {
    "mim_swin_base_patch4_win7": _published_swin(128, [4, 8, 16, 32], 7),
    "mim_swin_base_patch4_win14": _published_swin(128, [4, 8, 16, 32], 14),
    "mim_swin_large_patch4_win14": _published_swin(192, [6, 12, 24, 48], 14),
}
# Training arguments of the published scripts -> the ModelConfig field each one sets; the HOG ones count
# when the file was trained on HOG (the Swin script's `--target`; the ViT script has no other target).
_PUBLISHED_ARGS = {"input_size": "img_size"}
_PUBLISHED_HOG_ARGS = {"hog_nbins": "hog_nbins", "hog_bias": "hog_bias"}
_PUBLISHED_TARGETS = {"HOG": "hog", "Pixel": "pixels"}
_FAMILY_NAMES = {"vit": "ViT", "swin": "Swin"}


def _describe(keys: Any) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:8]) + (f", ... ({len(keys)} keys)" if len(keys) > 8 else "")


def _from_localmim(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Published LocalMIM encoder keys -> timm keys: the last tap norm becomes timm's `norm`."""
    taps = sorted({int(m.group(1)) for k in sd if (m := _TAP_NORM.fullmatch(k))})
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


def _unwrap(obj: Mapping) -> dict[str, Tensor]:
    """The state dict a file's dict holds (under 'model' or 'state_dict', or at the top level)."""
    inner = next((obj[k] for k in ("model", "state_dict") if isinstance(obj.get(k), Mapping)), obj)
    return {k.removeprefix("module."): v for k, v in inner.items()}  # DDP-saved state dicts prefix 'module.'


def _state_dict(obj: Any, path: Path) -> dict[str, Tensor]:
    """`_unwrap`, refusing a file that holds no dict."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict")
    return _unwrap(obj)


def _has_tap_norms(sd: Mapping[str, Tensor]) -> bool:
    return any(_TAP_NORM.fullmatch(k) for k in sd)


def published_arch(obj: Any) -> str | None:
    """The family of a published LocalMIM checkpoint's object, told by its LayerNorm per tap: "vit"
    (`norm.<k>`) or "swin" (`encoder.norm.<k>`); None for any other object."""
    if not isinstance(obj, Mapping):
        return None
    sd = _unwrap(obj)
    if _has_tap_norms(sd):
        return "vit"
    return "swin" if any(_SWIN_TAP_NORM.fullmatch(k) for k in sd) else None


def is_published_localmim(obj: Any) -> bool:
    """Whether a file's object is a published LocalMIM ViT or Swin checkpoint."""
    return published_arch(obj) is not None


def timm_state_dict(obj: Any, path: Path) -> dict[str, Tensor]:
    """The timm-named encoder state dict inside a timm, MAE or published LocalMIM file's object."""
    sd = _state_dict(obj, path)
    if any(k.startswith("stages.") for k in sd):
        raise ValueError(f"{path}: isolocal StagewiseEncoder weights without their run config: missing keys ['config']")
    if published_arch(sd) == "swin":
        raise ValueError(f"{path} is a published LocalMIM Swin checkpoint: it loads whole, as a StagewiseEncoder "
                         "given the config of its model (load_model(path, cfg)), not as a timm ViT encoder")
    if _has_tap_norms(sd):
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


# ---- a published LocalMIM model, decoders included ----------------------------------------------------

def _owner(index: int, firsts: list[int]) -> tuple[int, int]:
    """The stage holding a published block (ViT) or Swin stage (Swin), and its index there, given each
    stage's first one."""
    k = max(k for k, first in enumerate(firsts) if first <= index)
    return k, index - firsts[k]


def _vit_key(key: str, firsts: list[int]) -> str:
    """A published ViT encoder entry's `StagewiseEncoder` name: stage 0 takes the patch embedding, CLS
    token and position table, blocks split at the taps, `norm.<k>` is stage k's norm."""
    if m := _BLOCK.fullmatch(key):
        k, i = _owner(int(m[1]), firsts)
        return f"stages.{k}.blocks.{i}.{m[2]}"
    if m := _TAP_NORM.fullmatch(key):
        return f"stages.{m[1]}.norm.{m[2]}"
    if key.partition(".")[0] in ("patch_embed", "cls_token", "pos_embed"):
        return f"stages.0.{key}"
    return key


def _swin_key(key: str, firsts: list[int]) -> str:
    """A published Swin encoder entry's `StagewiseEncoder` name: stage 0 takes the patch embedding, Swin
    stage s (its blocks and the patch merging after it, as in isolocal) goes to the stage holding it,
    `encoder.norm.<k>` is stage k's norm."""
    if m := _SWIN_LAYER.fullmatch(key):
        k, i = _owner(int(m[1]), firsts)
        return f"stages.{k}.layers.{i}.{m[2]}"
    if m := _SWIN_TAP_NORM.fullmatch(key):
        return f"stages.{m[1]}.norm.{m[2]}"
    if key.startswith("encoder.patch_embed."):
        return "stages.0." + key.removeprefix("encoder.")
    return key


_ENCODER_KEYS = {"vit": _vit_key, "swin": _swin_key}


def _stagewise_entries(sd: Mapping[str, Tensor], arch: str, cfg: ModelConfig) -> dict[str, tuple[str, Tensor]]:
    """Every entry of a published file but its HOG layers, by its `StagewiseEncoder` name: (the file's
    name, the value; a decoder's as `published_decoder_entry` gives it, still in MAE's channel order). An
    entry with no such name keeps its own, so the fit check reports it."""
    firsts = [0] + [t + 1 for t in cfg.taps[:-1]]  # each stage starts after the previous tap
    entries = {}
    for key, value in sd.items():
        if key.startswith("hog_enc."):
            continue
        if m := _DECODER.fullmatch(key):
            name, value = published_decoder_entry(m[2], value)
            entries[f"stages.{m[1]}.decoder.{name}"] = (key, value)
        else:
            entries[_ENCODER_KEYS[arch](key, firsts)] = (key, value)
    return entries


def check_published_args(args: Any, cfg: ModelConfig, path: Path) -> None:
    """Refuse a config that contradicts a published file's training arguments: the geometry of the model
    it names (`PUBLISHED_VITS`, `PUBLISHED_SWINS`: chiefly the attention heads, taps and LayerNorm eps,
    which no weight shape shows), the target, the input size and the HOG settings. A model name the
    published code does not define is not checked."""
    said = vars(args) if isinstance(args, argparse.Namespace) else dict(args) if isinstance(args, Mapping) else {}
    target = said.get("target", "HOG")
    if target == "Pixel" and not said.get("norm_pix_loss", False):
        raise ValueError(f"{path} was trained on raw pixels (its args: target 'Pixel' without norm_pix_loss), but "
                         "isolocal's pixel targets are normalized per patch (docs/method.md §3): its decoders "
                         "predict another target")
    expected = dict((PUBLISHED_VITS | PUBLISHED_SWINS).get(said.get("model"), {}))
    if "target" in said and target in _PUBLISHED_TARGETS:
        expected["target"] = _PUBLISHED_TARGETS[target]
    fields = _PUBLISHED_ARGS | (_PUBLISHED_HOG_ARGS if target == "HOG" else {})
    expected |= {field: said[arg] for arg, field in fields.items() if arg in said}
    for field, value in expected.items():
        ours = getattr(cfg, field)
        if field == "decoder_heads":
            ours = [per_tap(ours, k) for k in range(len(cfg.taps))]
        if ours != value:
            raise ValueError(f"{path} was trained with {field} {value!r} (its args: model {said.get('model')!r}), "
                             f"but the config's model has {field} {ours!r}: pass the config of the model it holds")


def _published_hog_offsets(sd: Mapping[str, Tensor], cfg: ModelConfig, path: Path) -> Tensor | None:
    """The per-tap (g0, g1) offsets of a published file's HOG layers, (taps, 2), or None when they carry
    none, after checking that the layers compute isolocal's HOG targets for the config: one layer per
    tap, each the fixed gradient kernel pair, offsets exactly when the config has `hog_bias`."""
    layers: dict[int, dict[str, Tensor]] = {}
    for key, value in sd.items():
        if key.startswith("hog_enc."):
            m = _HOG_LAYER.fullmatch(key)
            if m is None:
                raise ValueError(f"{path}: unknown HOG-layer entry {key}; a published HOG layer holds conv.weight "
                                 "and, with hog_bias, conv.bias")
            layers.setdefault(int(m[1]), {})[m[2]] = value
    if not layers:
        if cfg.target == "hog":
            raise ValueError(f"{path} has no HOG layers (hog_enc.*): it was trained on pixels, but the config's "
                             "model.target is 'hog': set model.target = 'pixels'")
        return None
    if cfg.target != "hog":
        raise ValueError(f"{path} was trained on HOG targets (hog_enc.*), but the config's model.target is "
                         f"{cfg.target!r}: set model.target = 'hog'")
    if sorted(layers) != list(range(len(cfg.taps))):
        raise ValueError(f"{path} has HOG layers {sorted(layers)}, but the config's model has {len(cfg.taps)} taps "
                         "(one HOG layer each)")
    for k, layer in sorted(layers.items()):
        weight = layer.get("weight")
        if weight is None or tuple(weight.shape) != (2, 1, 3, 3) or not torch.equal(weight.float(), hog_kernels()):
            raise ValueError(f"{path}: hog_enc.{k}.conv.weight is not the fixed kernel pair [[1,0,-1],[2,0,-2],"
                             "[1,0,-1]] and its transpose that isolocal's HOG target computes")
    with_offsets = [k for k, layer in sorted(layers.items()) if "bias" in layer]
    if (with_offsets and len(with_offsets) < len(layers)) or bool(with_offsets) != cfg.hog_bias:
        raise ValueError(f"{path}: HOG layers {with_offsets} of {sorted(layers)} carry an offset (conv.bias), but "
                         f"the config's model.hog_bias is {cfg.hog_bias}: every layer has one exactly when "
                         "hog_bias is true")
    return torch.stack([layers[k]["bias"].float() for k in with_offsets]) if with_offsets else None


def _check_relative_indices(model: StagewiseEncoder, entries: Mapping[str, tuple[str, Tensor]], path: Path) -> None:
    """Refuse a Swin file whose saved relative position indices are not the ones isolocal's blocks use:
    its bias tables would be laid out otherwise. (The published code saves them; timm rebuilds them.)"""
    for key, (file_key, value) in entries.items():
        if key.endswith(_RELATIVE_INDEX) and not torch.equal(value.long(), model.get_buffer(key)):
            raise ValueError(f"{path}: {file_key} is not Swin's relative position index for its window, so its "
                             "relative_position_bias_table rows mean other offsets than isolocal reads them as")


def published_model(obj: Any, cfg: ModelConfig, path: Path, model_source: str) -> StagewiseEncoder:
    """The `StagewiseEncoder` of `cfg` holding a published LocalMIM ViT or Swin file's weights, decoders included.

    Encoder entries go to their stages (`_vit_key`, `_swin_key`; a Swin patch merging's weights regrouped
    to standard Swin's neighbour order by `merge_weight_from_published`); each `decoder.<k>` is permuted to
    isolocal's position-table layout by `load_published_decoder`; the HOG layers are checked and their
    offsets, if any, replace the seeded ones (the targets the decoders were trained against). Refused
    with one ValueError: a config of another family, training arguments that contradict it, weights
    that do not fit it (the first differing key and shapes; `model_source` says whose model), Swin
    relative position indices of another layout, or HOG layers that contradict it."""
    arch = published_arch(obj)
    if arch is None:
        raise ValueError(f"{path} is not a published LocalMIM checkpoint: it has no LayerNorm per tap "
                         "(norm.<k>.* or encoder.norm.<k>.*)")
    if cfg.arch != arch:
        raise ValueError(f"{path} is a published LocalMIM {_FAMILY_NAMES[arch]} checkpoint; the config's model.arch "
                         f"is {cfg.arch!r}")
    sd = _state_dict(obj, path)
    check_published_args(obj.get("args"), cfg, path)
    model = StagewiseEncoder(cfg)
    entries = _stagewise_entries(sd, arch, cfg)
    check_fits(model, {key: value for key, (_, value) in entries.items()}, path, model_source,
               {key: file_key for key, (file_key, _) in entries.items()})
    _check_relative_indices(model, entries, path)
    offsets = _published_hog_offsets(sd, cfg, path)
    check_finite_weights(sd, path)
    # The fit check compared every key, so what this leaves missing is exactly the decoders, loaded next.
    encoder = {key: merge_weight_from_published(m[1], value) if (m := _MERGE_WEIGHT.fullmatch(key)) else value
               for key, (_, value) in entries.items() if ".decoder." not in key and not key.endswith(_RELATIVE_INDEX)}
    model.load_state_dict(encoder, strict=False)
    for k, stage in enumerate(model.stages):
        load_published_decoder(stage.decoder, {m[2]: v for key, v in sd.items()
                                               if (m := _DECODER.fullmatch(key)) and int(m[1]) == k})
    if offsets is not None:
        model.target_bank.use_offsets(offsets)
    return model
