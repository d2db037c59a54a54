"""ResNet encoder split into stages at residual blocks, built from timm's ResNet blocks.

The encoder is timm's `ResNet`: a stem, then `depths[s]` residual blocks in timm stage s
(`layer{s+1}`), made by timm's own `make_blocks`, so downsampling, strides and drop path follow
timm. `model.taps` are global 0-based block indices: stage k owns blocks taps[k-1]+1 .. taps[k]
(stage 0 also the stem), so K runs from 1 to one stage per block, across timm's stage boundaries,
as in DGL / InfoPro. A stage's output is the feature map (B, C, H, W), which its head pools itself;
there is no token grid, mask or reconstruction target, so `mim` heads are rejected. Parameters keep
timm's names (`conv1`, `bn1`, `layer{s}.{i}`), so export is a renaming.

Two stems: `imagenet` is timm's (7x7/2 conv of width 64, 3x3/2 max pool); `cifar` is the 3x3/1 conv
of the first stage's width with no pool (He et al.'s CIFAR ResNet-20/32/110). timm's `ResNet` has no
argument for the CIFAR stem, so exports of non-standard geometries name `isolocal_resnet`, a timm
entrypoint registered here: timm's `ResNet` with that stem swapped in (`import isolocal.models.resnet`
before `timm.create_model("isolocal_resnet", ...)`).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from timm.models import register_model
from timm.models.resnet import BasicBlock, Bottleneck, ResNet, downsample_conv, make_blocks
from torch import Tensor, nn

from isolocal.config import ModelConfig
from isolocal.heads.base import HeadType, attach_head
from isolocal.heads.plan import StagePlan
from isolocal.models.family import Family, Tap, require
from isolocal.models.recompute import run_blocks
from isolocal.models.timm_export import timm_name_and_kwargs, timm_pool_kwargs, timm_state_dict

BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


def stem_width(stem: str, channels: list[int]) -> int:
    """timm's stem conv is 64 wide; the CIFAR stem is as wide as the first stage."""
    return 64 if stem == "imagenet" else channels[0]


def resnet_stem(stem: str, in_chans: int, width: int) -> tuple[nn.Conv2d, nn.Module]:
    """(conv1, maxpool) of the stem; `bn1` and `act1` are timm's BatchNorm and ReLU after conv1."""
    if stem == "imagenet":
        return nn.Conv2d(in_chans, width, 7, stride=2, padding=3, bias=False), nn.MaxPool2d(3, stride=2, padding=1)
    return nn.Conv2d(in_chans, width, 3, stride=1, padding=1, bias=False), nn.Identity()


def block_geometry(cfg: ModelConfig) -> tuple[list[int], list[int]]:
    """(output width, stride in pixels) of every residual block, by timm's rule (`make_blocks`: the
    first timm stage keeps the stem's resolution, each later one halves it; timm's output-stride cap
    of 32 is never reached, as its stride counts from 4 and there are at most 4 timm stages)."""
    widths, strides = [], []
    pixels = 4 if cfg.stem == "imagenet" else 1
    for s, (depth, width) in enumerate(zip(cfg.depths, cfg.channels)):
        if s > 0:
            pixels *= 2
        widths += [width * BLOCKS[cfg.block].expansion] * depth
        strides += [pixels] * depth
    return widths, strides


def _check_resnet(cfg: ModelConfig) -> None:
    """The geometry a ResNet needs; single-field ranges (img_size, in_chans, block, stem) are the
    config's (`isolocal.config.validate.validate_model`, which the model runs first)."""
    n = len(cfg.depths)
    require(1 <= n <= 4 and all(d >= 1 for d in cfg.depths),
            f"depths must list >= 1 residual block for each of 1 to 4 ResNet stages (timm's), got {cfg.depths}")
    require(len(cfg.channels) == n and all(c >= 1 for c in cfg.channels),
            f"channels must give one width >= 1 per ResNet stage ({n}, from depths), got {cfg.channels}")
    blocks = sum(cfg.depths)
    require(blocks >= 2, f"a ResNet needs >= 2 residual blocks (timm's drop-path rule), got depths {cfg.depths}")
    require(cfg.stem != "cifar" or cfg.channels[0] % 2 == 0,
            f"the cifar stem needs an even channels[0] (timm's ResNet sizes its stem in pairs), got {cfg.channels[0]}")
    require(len(cfg.taps) >= 1, "taps must list at least one block")
    require(all(b > a for a, b in zip(cfg.taps, cfg.taps[1:])), f"taps must be increasing, got {cfg.taps}")
    require(all(0 <= t < blocks for t in cfg.taps),
            f"taps must be residual block indices in [0, {blocks - 1}], got {cfg.taps}")
    require(cfg.taps[-1] == blocks - 1,
            f"the last tap must be the last block ({blocks - 1}), got {cfg.taps[-1]}; blocks after it would never train")
    stride = block_geometry(cfg)[1][-1]
    require(cfg.img_size % stride == 0, f"img_size {cfg.img_size} must be divisible by the ResNet's stride {stride}")


def resnet_taps(cfg: ModelConfig) -> list[Tap]:
    """One tap per stage at its last block: width, map side and stride (the grid masks are drawn on is
    the last map's; no head reads a mask or a target)."""
    _check_resnet(cfg)
    widths, strides = block_geometry(cfg)
    return [Tap(index=t, dim=widths[t], grid=cfg.img_size // strides[t], scale=1.0, cell=strides[t])
            for t in cfg.taps]


class ResNetStage(nn.Module):
    """A run of residual blocks (stage 0: after the stem) and the local head reading its map."""

    def __init__(self, cfg: ModelConfig, k: int, blocks: list[tuple[str, nn.Module]], tap: Tap, head: HeadType):
        super().__init__()
        self.timm_names = [name for name, _ in blocks]  # timm's `layer{s}.{i}` of each block
        self.has_stem = k == 0
        if self.has_stem:
            width = stem_width(cfg.stem, cfg.channels)
            self.conv1, self.maxpool = resnet_stem(cfg.stem, cfg.in_chans, width)
            self.bn1 = nn.BatchNorm2d(width)
            self.act1 = nn.ReLU(inplace=True)
        self.blocks = nn.Sequential(*[block for _, block in blocks])
        attach_head(self, head, cfg, tap.dim, _no_decoder, k)

    def forward(self, x: Tensor, ctx: None = None) -> Tensor:
        """Images (first stage) or the previous stage's map -> this stage's map."""
        if self.has_stem:
            x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        return run_blocks(self, self.blocks, x)

    def features(self, x: Tensor) -> Tensor:
        """The stage's map as it is (B, C, H, W): heads and probes pool it themselves."""
        return x


def _no_decoder() -> nn.Module:
    raise ValueError("a ResNet stage has no MIM decoder")  # unreachable: the model refuses 'mim' first (`decoders`)


def build_resnet_stages(cfg: ModelConfig, taps: list[Tap], plan: StagePlan) -> list[ResNetStage]:
    """timm's blocks (made once, in timm's order), dealt to the stages; timm's init (He normal convs,
    zero last BatchNorm of every residual branch)."""
    stages, _ = make_blocks(tuple(BLOCKS[cfg.block] for _ in cfg.depths), tuple(cfg.channels), tuple(cfg.depths),
                            stem_width(cfg.stem, cfg.channels), drop_path_rate=cfg.drop_path_rate,
                            act_layer=nn.ReLU, norm_layer=nn.BatchNorm2d)
    blocks = [(f"{name}.{i}", block) for name, layer in stages for i, block in enumerate(layer)]
    starts = [0] + [t.index + 1 for t in taps[:-1]]
    built = [ResNetStage(cfg, k, blocks[s:t.index + 1], t, plan.heads[k]) for k, (s, t) in enumerate(zip(starts, taps))]
    for stage in built:
        init_resnet(stage, stage.blocks)
    return built


def init_resnet(module: nn.Module, blocks: nn.Sequential) -> None:
    """timm's ResNet init: He normal convs of `module`, the last BatchNorm of every residual branch of
    `blocks` zero (each block starts as its shortcut)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    for block in blocks:
        block.zero_init_last()


def resnet_copy_layers(cfg: ModelConfig, after: int, layers: Sequence[int], width: float) -> tuple[nn.Sequential, int]:
    """Fresh residual blocks shaped like backbone blocks `layers` (of the config's block type, `width` x
    their channels), reading block `after`'s output, initialised as the backbone; and their output width.
    A copy downsamples (stride 2, with timm's 1x1 conv-BN shortcut) while the copies' resolution is above
    the backbone's at the block it copies, one halving per block (when sampled blocks skip a resolution,
    the later copies catch up)."""
    widths, strides = block_geometry(cfg)
    channels = [c for c, depth in zip(cfg.channels, cfg.depths) for _ in range(depth)]
    block_type = BLOCKS[cfg.block]
    blocks, in_dim, reached = [], widths[after], strides[after]  # `reached`: the copies' stride so far
    for j in layers:
        stride = 2 if strides[j] > reached else 1
        reached *= stride
        planes = max(1, round(channels[j] * width))
        out = planes * block_type.expansion
        shortcut = downsample_conv(in_dim, out, 1, stride, norm_layer=nn.BatchNorm2d) if stride != 1 or in_dim != out \
            else None
        blocks.append(block_type(in_dim, planes, stride, shortcut, act_layer=nn.ReLU, norm_layer=nn.BatchNorm2d))
        in_dim = out
    copies = nn.Sequential(*blocks)
    init_resnet(copies, copies)
    return copies, in_dim


def resnet_mask_grid(cfg: ModelConfig) -> int:
    """The last map's side: masks are drawn (the trainer always draws one) and dropped, as no head reads them."""
    return resnet_taps(cfg)[-1].grid


# ---- export to timm's ResNet ----------------------------------------------------------------------

_TIMM_SIZES = {("basic", (2, 2, 2, 2)): "resnet18", ("basic", (3, 4, 6, 3)): "resnet34",
               ("bottleneck", (3, 4, 6, 3)): "resnet50", ("bottleneck", (3, 4, 23, 3)): "resnet101",
               ("bottleneck", (3, 8, 36, 3)): "resnet152"}


@register_model
def isolocal_resnet(pretrained: bool = False, block: str = "basic", layers: tuple[int, ...] = (2, 2, 2, 2),
                    channels: tuple[int, ...] = (64, 128, 256, 512), stem: str = "imagenet",
                    **kwargs: Any) -> ResNet:
    """timm's `ResNet` at any isolocal geometry, with what its constructor cannot express: `block` by
    name; the `cifar` stem (the ResNet is built with a deep stem 2 x stem_width wide, then conv1 and
    maxpool are swapped for the 3x3/1 conv and no pool; keys stay timm's); fewer than 4 stages
    (`forward_features` always runs layer1..layer4: the missing ones are identities)."""
    if pretrained:
        raise ValueError("isolocal_resnet has no pretrained weights; load an `isolocal export` state dict")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    width = stem_width(stem, list(channels))
    stem_kw = {} if stem == "imagenet" else dict(stem_type="deep", stem_width=width // 2)
    model = ResNet(BLOCKS[block], tuple(layers), channels=tuple(channels), **stem_kw, **kwargs)
    if stem == "cifar":
        model.conv1, model.maxpool = resnet_stem(stem, model.in_chans, width)
    for s in range(len(layers), 4):
        setattr(model, f"layer{s + 1}", nn.Identity())
    return model


def _resnet_timm_key(stage: nn.Module, head: str, rest: str) -> str | None:
    """Stage-local blocks become timm's `layer{s}.{i}`; the stem keeps its names; heads stay out."""
    if head == "blocks":
        index, _, tail = rest.partition(".")
        return f"{stage.timm_names[int(index)]}.{tail}"
    if head in ("conv1", "bn1"):
        return f"{head}.{rest}"
    return None


def resnet_state_dict(model: Any) -> dict[str, Tensor]:
    """Encoder weights (and BatchNorm statistics) under timm's ResNet names."""
    return timm_state_dict(model.stages, _resnet_timm_key)


def resnet_timm_name_and_kwargs(model: Any) -> tuple[str, dict[str, Any]]:
    """timm's own name for a standard ImageNet ResNet, else `isolocal_resnet` with the geometry."""
    c = model.cfg
    standard = c.stem == "imagenet" and list(c.channels) == [64, 128, 256, 512]
    registered = _TIMM_SIZES.get((c.block, tuple(c.depths))) if standard else None
    return timm_name_and_kwargs(c, registered, "isolocal_resnet", dict(
        block=c.block, layers=list(c.depths), channels=list(c.channels), stem=c.stem))


RESNET = Family(taps=resnet_taps, build_stages=build_resnet_stages, mask_grid=resnet_mask_grid,
                context=lambda cfg, mask, host_mask: None, has_cls=False,
                timm_name_and_kwargs=resnet_timm_name_and_kwargs, timm_state_dict=resnet_state_dict,
                timm_pool_kwargs=timm_pool_kwargs,
                has_attention=False, decoders=False, copy_layers=resnet_copy_layers,
                live_layers=lambda stage: stage.blocks)
