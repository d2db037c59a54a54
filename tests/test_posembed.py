"""Fixed sin-cos positions against MAE's formula, a published decoder loaded onto isolocal's layout, and a
whole published LocalMIM ViT or Swin checkpoint (encoder, decoders, HOG layers) loaded into a StagewiseEncoder."""
import argparse
import dataclasses
import math
import os
from pathlib import Path

import pandas as pd
import pytest
import torch
from timm.models.swin_transformer import PatchMerging
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import isolocal
from analysis.loading import load_images
from isolocal.cli import main
from isolocal.config import load_run_config
from isolocal.config.presets import preset_config
from isolocal.data import FASHION_MNIST_ROOT
from isolocal.errors import CheckpointError
from isolocal.io.foreign import check_published_args
from isolocal.io.load import load_model
from isolocal.models.decoder import LocalDecoder, load_published_decoder
from isolocal.models.posembed import mae_channel_order, sincos_pos_embed
from isolocal.models.swin import merge_weight_from_published


def mae_sincos(dim: int, grid: int) -> torch.Tensor:
    """MAE's 2-D sin-cos table (`get_2d_sincos_pos_embed`, which LocalMIM publishes) from its
    definition, in float64: with q = dim / 4 and w_i = 10000^(-i / q), the token in row r, column c is
    [sin(c w_i)]_i, [cos(c w_i)]_i, [sin(r w_i)]_i, [cos(r w_i)]_i; the column comes first because MAE's
    meshgrid puts the width axis first and its first half encodes that axis."""
    q = dim // 4
    table = torch.zeros(grid * grid, dim, dtype=torch.float64)
    for r in range(grid):
        for c in range(grid):
            for i in range(q):
                w = 10000.0 ** (-i / q)
                table[r * grid + c, [i, q + i, 2 * q + i, 3 * q + i]] = torch.tensor(
                    [math.sin(c * w), math.cos(c * w), math.sin(r * w), math.cos(r * w)], dtype=torch.float64)
    return table


@pytest.mark.parametrize("dim, grid", [(16, 4), (64, 7), (128, 14)])
def test_positions_are_maes_table_with_the_channels_permuted(dim, grid):
    mae = mae_sincos(dim, grid)
    order = mae_channel_order(dim)
    assert sorted(order.tolist()) == list(range(dim))
    ours = sincos_pos_embed(dim, grid, cls_token=False)[0].double()
    torch.testing.assert_close(ours, mae[:, order], rtol=0, atol=1e-6)
    assert (ours - mae).abs().max() > 0.5  # the same values, not the same layout
    decoder = LocalDecoder(8, dim, 1, 2, 4.0, grid, 1.0, 3)
    assert torch.equal(decoder.pos_embed[0, 0], torch.zeros(dim))  # the CLS row
    torch.testing.assert_close(decoder.pos_embed[0, 1:].double(), mae[:, order], rtol=0, atol=1e-6)


def permuted(decoder: LocalDecoder, order: torch.Tensor) -> dict[str, torch.Tensor]:
    """The decoder's weights with the width axis of each permuted by `order`."""
    axes = decoder.width_axes()
    return {k: v.index_select(axes[k], order) if k in axes else v for k, v in decoder.state_dict().items()}


def randomized(decoder: LocalDecoder) -> LocalDecoder:
    """The decoder with random 1-D weights: LayerNorms start at 1 and 0, which any permutation leaves as they are."""
    with torch.no_grad():
        for p in decoder.parameters():
            if p.dim() == 1:
                p.normal_()
    return decoder


def decode(decoder: LocalDecoder, x: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return decoder.eval()(x, restore)


def inputs(grid: int, has_cls: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    restore = torch.stack([torch.randperm(grid * grid, generator=g) for _ in range(2)])
    return torch.randn(2, int(has_cls) + grid * grid // 4, 24, generator=g), restore


@pytest.mark.parametrize("scale, has_cls", [(4.0, True), (2.0, True), (1.0, False), (0.5, True)])
def test_permuting_every_width_axis_leaves_the_decoder_unchanged(scale, has_cls):
    """`width_axes` names every weight that meets the decoder width: permute them all and the decoder
    computes the same predictions (a weight left out would scramble them)."""
    torch.manual_seed(0)
    decoder = randomized(LocalDecoder(24, 32, 2, 4, 4.0, 4, scale, 5, has_cls=has_cls))
    twin = LocalDecoder(24, 32, 2, 4, 4.0, 4, scale, 5, has_cls=has_cls)
    twin.load_state_dict(permuted(decoder, torch.randperm(32)))
    x, restore = inputs(4, has_cls)
    torch.testing.assert_close(decode(twin, x, restore), decode(decoder, x, restore), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scale, has_cls", [(4.0, True), (1.0, False)])
def test_a_published_decoder_loads_onto_isolocals_table(scale, has_cls):
    """A published decoder: the same modules (its head named `pred`) with MAE's table and weights
    trained against it. Loaded by name it computes the published function with MAE's table;
    `load_published_decoder` gives the same predictions with isolocal's own table."""
    torch.manual_seed(0)
    source = randomized(LocalDecoder(24, 32, 1, 4, 4.0, 4, scale, 5, has_cls=has_cls))
    mae = mae_sincos(32, 4).float()
    published = {("pred." + k.removeprefix("head.") if k.startswith("head.") else k): v
                 for k, v in source.state_dict().items()}
    published["pos_embed"] = torch.cat([torch.zeros(int(has_cls), 32), mae]).unsqueeze(0)
    by_name = LocalDecoder(24, 32, 1, 4, 4.0, 4, scale, 5, has_cls=has_cls)
    by_name.load_state_dict({("head." + k.removeprefix("pred.") if k.startswith("pred.") else k): v
                             for k, v in published.items()})
    mapped = LocalDecoder(24, 32, 1, 4, 4.0, 4, scale, 5, has_cls=has_cls)
    load_published_decoder(mapped, published)
    torch.testing.assert_close(mapped.pos_embed, sincos_pos_embed(32, 4, cls_token=has_cls), rtol=0, atol=1e-6)
    x, restore = inputs(4, has_cls)
    torch.testing.assert_close(decode(mapped, x, restore), decode(by_name, x, restore), rtol=1e-5, atol=1e-5)


def test_a_published_decoder_of_another_width_is_refused():
    published = LocalDecoder(24, 16, 1, 4, 4.0, 4, 1.0, 5).state_dict()
    with pytest.raises(ValueError, match="mask_token has shape .1, 1, 16.: its axis 2 should be the decoder width 32"):
        load_published_decoder(LocalDecoder(24, 32, 1, 4, 4.0, 4, 1.0, 5), published)


# ---- a whole published checkpoint ---------------------------------------------------------------------

NANO = ["preset=localmim_vit_nano"]
GRADIENT_KERNELS = torch.tensor([[[[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]]],
                                 [[[1.0, 2.0, 1.0], [0.0, 0.0, 0.0], [-1.0, -2.0, -1.0]]]])  # the published HOG conv


def mae_ordered_decoder(decoder: LocalDecoder, prefix: str) -> dict[str, torch.Tensor]:
    """A decoder as the published code saves it, its names under `prefix`: the head named pred and every
    decoder-width axis in MAE's channel order (isolocal's channel j is MAE's channel order[j], so MAE's
    channel i is isolocal's argsort(order)[i])."""
    axes = decoder.width_axes()
    to_mae = torch.argsort(mae_channel_order(decoder.embed.out_features))
    return {prefix + ("pred." + name.removeprefix("head.") if name.startswith("head.") else name):
            value.index_select(axes[name], to_mae) if name in axes else value.clone()
            for name, value in decoder.state_dict().items()}


def hog_layers(model: isolocal.StagewiseEncoder) -> dict[str, torch.Tensor]:
    """One published HOG layer per tap: the fixed kernels and, with hog_bias, the tap's offset as the conv bias."""
    state = {}
    for k in range(model.num_stages):
        state[f"hog_enc.{k}.conv.weight"] = GRADIENT_KERNELS.clone()
        if model.target_bank.bias is not None:
            state[f"hog_enc.{k}.conv.bias"] = model.target_bank.bias[k].clone()
    return state


def published_state(model: isolocal.StagewiseEncoder) -> dict[str, torch.Tensor]:
    """`model` under the published LocalMIM ViT code's names, written from that naming: the encoder flat
    (patch_embed, cls_token, pos_embed; blocks by global index; norm.<k> per tap), decoder.<k> in MAE's
    channel order, the HOG layers."""
    state = hog_layers(model)
    for k, stage in enumerate(model.stages):
        state |= mae_ordered_decoder(stage.decoder, f"decoder.{k}.")
        for name, value in stage.state_dict().items():
            module, _, rest = name.partition(".")
            if module == "blocks":
                index, _, tail = rest.partition(".")
                state[f"blocks.{stage.first_block + int(index)}.{tail}"] = value.clone()
            elif module == "norm":
                state[f"norm.{k}.{rest}"] = value.clone()
            elif module != "decoder":
                state[name] = value.clone()
    return state


# The offsets (row, col) of a 2 x 2 neighbourhood in the order each code concatenates them for patch merging:
# standard Swin's x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2]; the published code's
# view(..., r/2, 2, r/2, 2, C).permute(0, 1, 2, 4, 3, 5, 6), which puts the column offset last.
STANDARD_NEIGHBOURS = [(0, 0), (1, 0), (0, 1), (1, 1)]
PUBLISHED_NEIGHBOURS = [(0, 0), (0, 1), (1, 0), (1, 1)]


def published_neighbour_order(value: torch.Tensor, axis: int) -> torch.Tensor:
    """A patch-merging weight's 4C axis from standard Swin's neighbour order to the published one."""
    source = torch.tensor([STANDARD_NEIGHBOURS.index(offset) for offset in PUBLISHED_NEIGHBOURS])
    return value.unflatten(axis, (4, -1)).index_select(axis, source).flatten(axis, axis + 1)


def swin_relative_index(window: int) -> torch.Tensor:
    """Swin's relative position index from its definition: query p, key q of a window read bias-table row
    (row_p - row_q + w - 1) * (2w - 1) + (col_p - col_q + w - 1)."""
    rows, cols = torch.arange(window).repeat_interleave(window), torch.arange(window).repeat(window)
    return (rows[:, None] - rows[None] + window - 1) * (2 * window - 1) + cols[:, None] - cols[None] + window - 1


def published_swin_state(model: isolocal.StagewiseEncoder) -> dict[str, torch.Tensor]:
    """`model` under the published LocalMIM Swin code's names, written from that naming: the encoder under
    `encoder.` (patch_embed; layers.<s> by Swin stage, each block with its relative position index, the
    patch merging after Swin stage s in the published neighbour order; norm.<k> per tap), decoder.<k> in
    MAE's channel order with a Linear pred, the HOG layers (none for pixel targets)."""
    state = hog_layers(model) if model.cfg.target == "hog" else {}
    for k, stage in enumerate(model.stages):
        decoder = mae_ordered_decoder(stage.decoder, f"decoder.{k}.")
        decoder[f"decoder.{k}.pred.weight"] = decoder.pop(f"decoder.{k}.pred.0.weight")[:, :, 0, 0]
        decoder[f"decoder.{k}.pred.bias"] = decoder.pop(f"decoder.{k}.pred.0.bias")
        state |= decoder
        for name, value in stage.state_dict().items():
            module, _, rest = name.partition(".")
            if module == "layers":
                index, _, tail = rest.partition(".")
                s = stage.first + int(index)
                if tail.startswith("downsample."):
                    part = tail.removeprefix("downsample.")
                    value = published_neighbour_order(value, 1 if part == "reduction.weight" else 0)
                state[f"encoder.layers.{s}.{tail}"] = value.clone()
            elif module == "norm":
                state[f"encoder.norm.{k}.{rest}"] = value.clone()
            elif module == "patch_embed":
                state[f"encoder.{name}"] = value.clone()
        for i, layer in enumerate(stage.layers):
            for j, block in enumerate(layer.blocks):
                index = swin_relative_index(block.window_size[0])
                state[f"encoder.layers.{stage.first + i}.blocks.{j}.attn.relative_position_index"] = index
    return state


# What the published scripts' `args` say for the test models (no published model has these names).
PUBLISHED_ARGS = {"vit": {"model": "MIM_vit_nano_patch4", "input_size": 32, "hog_nbins": 9, "mask_ratio": 0.75},
                  "swin": {"model": "mim_swin_nano_patch1_win4", "input_size": 32, "target": "HOG", "hog_nbins": 18,
                           "norm_pix_loss": False, "mask_ratio": 0.75}}


def save_published(encoder: isolocal.StagewiseEncoder, path, **args) -> None:
    """The file the published pre-training script writes: the model, its training args (`args` replace
    some), the epoch."""
    said = PUBLISHED_ARGS[encoder.cfg.arch] | {"hog_bias": encoder.cfg.hog_bias}
    if encoder.cfg.target == "pixels":
        said |= {"target": "Pixel", "norm_pix_loss": True}
    state = published_state(encoder) if encoder.cfg.arch == "vit" else published_swin_state(encoder)
    torch.save({"model": state, "args": argparse.Namespace(**(said | args)), "epoch": 99}, path)


def trained_like(preset: str = "localmim_vit_nano", **overrides) -> isolocal.StagewiseEncoder:
    """A preset's model with every weight moved off its init (LayerNorms too), fixed tables kept."""
    torch.manual_seed(0)
    model = isolocal.create_model(preset, **overrides)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not name.endswith("pos_embed"):
                param.add_(0.05 * torch.randn_like(param))
    return model.eval()


def fixed_batch(model: isolocal.StagewiseEncoder) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(4, 1, 32, 32, generator=g), model.random_mask(4, g)


@pytest.mark.parametrize("hog_bias", [False, True])
def test_a_published_checkpoint_loads_whole_and_computes_the_same_losses(tmp_path, hog_bias):
    """Read with its model's config, a published file is the model it was written from: every weight equal,
    and the same losses on the same images and mask. With hog_bias the file's offsets (seed 5 here) are
    the targets' offsets, not the ones the config would draw (seed 0)."""
    original = trained_like(hog_bias=hog_bias, hog_bias_seed=5)
    save_published(original, tmp_path / "checkpoint-99.pth")
    published = torch.load(tmp_path / "checkpoint-99.pth", weights_only=False)["model"]
    mae = torch.cat([torch.zeros(1, 64), mae_sincos(64, 8).float()]).unsqueeze(0)
    torch.testing.assert_close(published["decoder.2.pos_embed"], mae, rtol=0, atol=1e-6)  # MAE's layout in the file

    cfg = load_run_config(None, NANO + ["model.hog_bias=true"] * hog_bias)
    assert_loaded_is(original, load_model(tmp_path / "checkpoint-99.pth", cfg), cfg)


def assert_loaded_is(original: isolocal.StagewiseEncoder, loaded: nn.Module, cfg) -> None:
    """`loaded`, read with `cfg` from a published file written from `original`, is `original`: in eval mode,
    every weight equal, the file's HOG offsets (not the ones `cfg` would draw), the same losses on the
    same images and mask."""
    assert isinstance(loaded, isolocal.StagewiseEncoder) and not loaded.training
    want = original.state_dict()
    assert loaded.state_dict().keys() == want.keys()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, want[key]), key
    if original.target_bank.bias is not None:
        assert torch.equal(loaded.target_bank.bias, original.target_bank.bias)
        assert not torch.equal(loaded.target_bank.bias, isolocal.StagewiseEncoder(cfg.model).target_bank.bias)
    images, mask = fixed_batch(original)
    with torch.no_grad():
        got, expected = loaded(images, mask).losses, original(images, mask).losses
    torch.testing.assert_close(torch.stack(got), torch.stack(expected), rtol=0, atol=1e-6)


def test_encoder_only_reading_of_a_published_checkpoint_is_a_timm_vit(tmp_path):
    original = trained_like()
    save_published(original, tmp_path / "published.pth")
    images, _ = fixed_batch(original)
    cfg = load_run_config(None, NANO)
    for loaded in (load_model(tmp_path / "published.pth", arch_hint={"num_heads": 2}, encoder_only=True),
                   load_model(tmp_path / "published.pth", cfg, arch_hint={"num_heads": 2}, encoder_only=True)):
        assert isinstance(loaded, VisionTransformer)
        with torch.no_grad():
            torch.testing.assert_close(loaded.forward_features(images), original.encode(images)[-1], rtol=0, atol=1e-5)


def test_a_published_checkpoint_that_contradicts_the_config_is_refused(tmp_path):
    original = trained_like()
    path = tmp_path / "published.pth"
    save_published(original, path)
    with pytest.raises(ValueError, match=r"does not fit the model the given config describes \(preset localmim_vit_micro\): "
                                         r"first difference at stages.0.blocks.0.attn.proj.bias \(the file's "
                                         r"blocks.0.attn.proj.bias\) \(checkpoint: shape \(64,\), model: shape \(128,\)\)"):
        load_model(path, load_run_config(None, ["preset=localmim_vit_micro"]))
    three_taps = NANO + ["model.taps=[0, 1, 3]", "model.scales=[4.0, 2.0, 1.0]"]  # the file has a fourth
    with pytest.raises(ValueError, match=r"first difference at stages.3.decoder.blocks.0.attn.proj.bias \(the file's "
                                         r"decoder.3.blocks.0.attn.proj.bias\) \(checkpoint: shape \(64,\), model: missing\)"):
        load_model(path, load_run_config(None, three_taps))
    with pytest.raises(ValueError, match="is a published LocalMIM checkpoint: .*pass the config of its model"):
        load_model(path)
    with pytest.raises(ValueError, match="published LocalMIM ViT checkpoint; the config's model.arch is 'swin'"):
        load_model(path, load_run_config(None, ["preset=localmim_swin_nano"]))

    save_published(original, path, model="MIM_vit_base_patch16")  # the nano weights, said to be ViT-B's
    with pytest.raises(ValueError, match="trained with embed_dim 768 .*model 'MIM_vit_base_patch16'.*embed_dim 64"):
        load_model(path, load_run_config(None, NANO))
    save_published(original, path, hog_nbins=18)
    with pytest.raises(ValueError, match="trained with hog_nbins 18 .*the config's model has hog_nbins 9"):
        load_model(path, load_run_config(None, NANO))

    state = published_state(original)
    state["hog_enc.1.conv.weight"] = GRADIENT_KERNELS.transpose(2, 3)  # the kernels swapped: another target
    torch.save({"model": state}, path)
    with pytest.raises(ValueError, match="hog_enc.1.conv.weight is not the fixed kernel pair"):
        load_model(path, load_run_config(None, NANO))
    state = published_state(original) | {f"hog_enc.{k}.conv.bias": torch.zeros(2) for k in range(4)}
    torch.save({"model": state}, path)
    with pytest.raises(ValueError, match=r"HOG layers \[0, 1, 2, 3\] of \[0, 1, 2, 3\] carry an offset .*"
                                         r"model.hog_bias is False"):
        load_model(path, load_run_config(None, NANO))


@pytest.mark.parametrize("size, nbins, bias", [("small", 9, False), ("base", 9, False), ("large", 18, True)])
def test_the_published_models_and_recipes_are_the_localmim_presets(size, nbins, bias):
    """The published script's models with its recipes' HOG flags (ViT-L: --hog_nbins 18 --hog_bias) pass
    the args check against the matching preset; the attention heads, which no weight shape shows, are checked."""
    args = argparse.Namespace(model=f"MIM_vit_{size}_patch16", input_size=224, hog_nbins=nbins, hog_bias=bias)
    preset = preset_config(f"localmim_vit_{size}")
    check_published_args(args, preset, Path("checkpoint.pth"))
    with pytest.raises(ValueError, match=f"trained with num_heads {preset.num_heads} .*has num_heads 4"):
        check_published_args(args, dataclasses.replace(preset, num_heads=4), Path("checkpoint.pth"))


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_ROOT), reason="Fashion-MNIST is not installed")
def test_commands_take_a_published_checkpoint_with_its_config(tmp_path, capsys):
    """`analyze reconstruct` and `eval` read a published file given --set preset=...; without it they say so."""
    original = trained_like()
    path = tmp_path / "published.pth"
    save_published(original, path)
    out = tmp_path / "figs"
    assert main(["analyze", "reconstruct", "--ckpt", str(path), "--set", "preset=localmim_vit_nano",
                 "--images", "fmnist:3,4", "--mask-seed", "7", "--out", str(out)]) == 0
    table = pd.read_csv(out / "reconstruct_published.csv")
    images = load_images("fmnist:3,4", 32, 1).images
    with torch.no_grad():
        losses = original(images, original.random_mask(2, torch.Generator().manual_seed(7))).losses
    errors = table[table["index"] == -1].sort_values("stage")["masked_cell_error"].to_numpy()
    torch.testing.assert_close(torch.tensor(errors, dtype=torch.float32), torch.stack(losses), rtol=0, atol=1e-5)

    assert main(["eval", "knn", "--ckpt", str(path), "--set", "data.name='synthetic'", "data.synthetic_size=64",
                 "eval.knn_k=5", "--out", str(tmp_path / "eval.json")]) == 0
    capsys.readouterr()
    for argv, message in [(["analyze", "reconstruct"], "pass the config of its model"),
                          (["analyze", "nmi", "--set", "preset=localmim_vit_nano"], "`analyze nmi` reads every encoder")]:
        assert main([*argv, "--ckpt", str(path), "--images", "fmnist:0", "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err


# ---- a whole published Swin checkpoint ----------------------------------------------------------------

SWIN_NANO = ["preset=localmim_swin_nano"]


def test_a_published_patch_merging_computes_the_same_function_in_standard_order():
    """The published merge concatenates each 2 x 2 neighbourhood as (0, 0), (0, 1), (1, 0), (1, 1) (its
    unit-by-unit view and permute, here on one raster grid); its weights regrouped by
    `merge_weight_from_published` make timm's (standard Swin's) PatchMerging compute the same."""
    torch.manual_seed(0)
    C, x = 6, torch.randn(2, 8, 8, 6)
    published = PatchMerging(C, 2 * C)
    with torch.no_grad():
        published.norm.weight.normal_()
        published.norm.bias.normal_()
    tokens = torch.cat([x[:, dr::2, dc::2] for dr, dc in PUBLISHED_NEIGHBOURS], -1)
    expected = published.reduction(published.norm(tokens))
    standard = PatchMerging(C, 2 * C)
    standard.load_state_dict({name: merge_weight_from_published(name, value)
                              for name, value in published.state_dict().items()})
    with torch.no_grad():
        torch.testing.assert_close(standard(x), expected, rtol=1e-5, atol=1e-5)
        assert (published(x) - expected).abs().max() > 0.1  # the weights as they are mean other neighbours


@pytest.mark.parametrize("preset, sets, overrides", [
    ("localmim_swin_nano", ["model.hog_bias=false"], {"hog_bias": False}),
    ("localmim_swin_nano", [], {"hog_bias_seed": 5}),  # the preset's hog_bias, the file's offsets
    ("localmim_swin_nano_pix", [], {}),
])
def test_a_published_swin_checkpoint_loads_whole_and_computes_the_same_losses(tmp_path, preset, sets, overrides):
    """A published Swin file (written from an isolocal model: published names and merge order, MAE's decoder
    channel order, Linear decoder heads, saved relative position indices) read with its model's config is
    that model: every weight equal, the same per-stage losses; with hog_bias the file's offsets (seed 5)."""
    original = trained_like(preset, **overrides)
    save_published(original, tmp_path / "checkpoint-399.pth")
    cfg = load_run_config(None, [f"preset={preset}", *sets])
    assert_loaded_is(original, load_model(tmp_path / "checkpoint-399.pth", cfg), cfg)


def test_a_published_swin_checkpoint_that_contradicts_the_config_is_refused(tmp_path):
    original = trained_like("localmim_swin_nano")
    path = tmp_path / "published.pth"
    save_published(original, path)
    with pytest.raises(CheckpointError, match=r"first difference at stages.0.decoder.embed.weight \(the file's "
                                              r"decoder.0.embed.weight\) \(checkpoint: shape \(32, 64\), model: shape "
                                              r"\(32, 32\)\)"):
        load_model(path, load_run_config(None, SWIN_NANO + ["model.embed_dim=16"]))
    with pytest.raises(CheckpointError, match=r"first difference at stages.0.layers.0.blocks.0.attn.relative_position_"
                                              r"bias_table \(the file's encoder.layers.0.blocks.0.attn.relative_"
                                              r"position_bias_table\) \(checkpoint: shape \(49, 1\), model: shape "
                                              r"\(9, 1\)\)"):
        load_model(path, load_run_config(None, SWIN_NANO + ["model.window_size=2"]))
    with pytest.raises(ValueError, match="published LocalMIM Swin checkpoint; the config's model.arch is 'vit'"):
        load_model(path, load_run_config(None, NANO))
    with pytest.raises(ValueError, match="is a published LocalMIM checkpoint: .*pass the config of its model"):
        load_model(path)
    with pytest.raises(ValueError, match="published LocalMIM Swin checkpoint: it loads whole"):
        load_model(path, encoder_only=True)

    save_published(original, path, model="mim_swin_base_patch4_win7")  # the nano weights, said to be Swin-B's
    with pytest.raises(ValueError, match="trained with embed_dim 128 .*'mim_swin_base_patch4_win7'.*embed_dim 32"):
        load_model(path, load_run_config(None, SWIN_NANO))
    save_published(original, path, target="Pixel", norm_pix_loss=True)
    with pytest.raises(ValueError, match="trained with target 'pixels' .*the config's model has target 'hog'"):
        load_model(path, load_run_config(None, SWIN_NANO))
    save_published(original, path, target="Pixel")
    with pytest.raises(ValueError, match="trained on raw pixels .*normalized per patch"):
        load_model(path, load_run_config(None, SWIN_NANO))

    state = published_swin_state(original)
    key = "encoder.layers.1.blocks.1.attn.relative_position_index"
    state[key] = state[key].t().contiguous()  # offsets key minus query: the table read the other way round
    torch.save({"model": state}, path)
    with pytest.raises(ValueError, match=f"{key} is not Swin's relative position index"):
        load_model(path, load_run_config(None, SWIN_NANO))
    state = {k: v for k, v in published_swin_state(original).items() if not k.startswith("hog_enc.")}
    torch.save({"model": state}, path)
    with pytest.raises(ValueError, match="has no HOG layers .*model.target is 'hog'"):
        load_model(path, load_run_config(None, SWIN_NANO))


@pytest.mark.parametrize("model, preset, sets, target", [
    ("mim_swin_base_patch4_win7", "localmim_swin_base", [], "HOG"),
    ("mim_swin_base_patch4_win7", "localmim_swin_base_pix", [], "Pixel"),
    ("mim_swin_base_patch4_win14", "localmim_swin_base", ["model.window_size=14"], "HOG"),
    ("mim_swin_large_patch4_win14", "localmim_swin_large", ["model.window_size=14"], "HOG"),
])
def test_the_published_swin_models_and_recipes_are_the_localmim_swin_presets(model, preset, sets, target):
    """The published Swin models with the README's recipes (HOG: --hog_nbins 18 --hog_bias; Pixel:
    --norm_pix_loss) pass the args check against the matching preset, the window-14 ones with
    model.window_size=14; the window, heads and LayerNorm eps, which the args fix, are checked."""
    hog = target == "HOG"
    args = argparse.Namespace(model=model, input_size=224, target=target, hog_nbins=18 if hog else 9, hog_bias=hog,
                              norm_pix_loss=not hog)
    cfg = load_run_config(None, [f"preset={preset}", *sets]).model
    check_published_args(args, cfg, Path("checkpoint.pth"))
    window, other = (7, 14) if model.endswith("win7") else (14, 7)
    with pytest.raises(ValueError, match=f"trained with window_size {window} .*has window_size {other}"):
        check_published_args(args, dataclasses.replace(cfg, window_size=other), Path("checkpoint.pth"))
    with pytest.raises(ValueError, match=r"trained with swin_norm_eps 1e-06 .*has swin_norm_eps 1e-05"):
        check_published_args(args, dataclasses.replace(cfg, swin_norm_eps=1e-5), Path("checkpoint.pth"))
    with pytest.raises(ValueError, match=r"trained with stage_heads \[.*has stage_heads \[1, 2, 4, 8\]"):
        check_published_args(args, dataclasses.replace(cfg, stage_heads=[1, 2, 4, 8]), Path("checkpoint.pth"))
