"""Swin LocalMIM: visible-token encoder vs a dense masked Swin, timm export, isolation, presets."""
from __future__ import annotations

import dataclasses
from collections import Counter
from functools import partial

import pytest
import timm
import torch
from timm.models.swin_transformer import window_partition, window_reverse

import isolocal
from isolocal.config import RunConfig, to_dict
from isolocal.core.masking import random_mask
from isolocal.models.encoder import StagewiseEncoder
from isolocal.models.swin import swin_context

SWIN_PRESETS = [n for n in isolocal.list_models() if "_swin_" in n]


def narrow_tiny(dtype: torch.dtype = torch.float64) -> isolocal.StagewiseEncoder:
    """Swin-T's published geometry (224 px, patch 4, window 7, 32 px units) at a test-sized width."""
    torch.manual_seed(0)
    model = isolocal.create_model("localmim_swin_tiny", embed_dim=12, depths=[2, 2, 2, 2],
                                  stage_heads=[1, 2, 2, 4]).to(dtype)
    with torch.no_grad():  # large relative position biases, so a wrong bias index cannot hide
        for name, p in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.normal_(std=1.0)
    return model


def reference_block(block, x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """timm's block on the full (B, H, W, C) grid (cyclic roll, its shift mask) with masked tokens as no keys."""
    B, H, W, C = x.shape
    ws, shift = block.window_size, block.shift_size
    h, vis = block.norm1(x), visible.unsqueeze(-1).to(x.dtype)
    if any(shift):
        h = torch.roll(h, (-shift[0], -shift[1]), (1, 2))
        vis = torch.roll(vis, (-shift[0], -shift[1]), (1, 2))
    windows = window_partition(h, ws).view(-1, ws[0] * ws[1], C)
    keys = window_partition(vis, ws).view(-1, 1, ws[0] * ws[1])
    attn_mask = ((1 - keys) * -1e9).expand(-1, keys.shape[-1], -1)
    if block.attn_mask is not None:
        attn_mask = attn_mask + block.attn_mask.to(x.dtype).repeat(B, 1, 1)
    out = window_reverse(block.attn(windows, mask=attn_mask).view(-1, *ws, C), ws, H, W)
    if any(shift):
        out = torch.roll(out, shift, (1, 2))
    x = x + out
    return x + block.mlp(block.norm2(x))


def reference_stage_outputs(model: isolocal.StagewiseEncoder, images: torch.Tensor, mask: torch.Tensor) -> list:
    """Each stage's output on the full grid and the visibility at its grid."""
    x = model.stages[0].patch_embed(images)
    B, H, W, _ = x.shape
    visible = ~mask.view(B, H, W)
    outs = []
    for stage in model.stages:
        for layer in stage.layers:
            for block in layer.blocks:
                x = reference_block(block, x, visible)
            if layer.downsample is not None:
                x, visible = layer.downsample(x), visible[:, ::2, ::2]
        outs.append((x, visible))
    return outs


def _masks(model, B: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    cfg = model.cfg
    masks = {f"per_batch_{i}": model.random_mask(B, g) for i in range(3)}
    masks["per_image"] = random_mask(B, model.mask_grid, cfg.mask_ratio, g, cfg.mask_unit, per_batch=False)
    masks["all_visible"] = torch.zeros(B, model.mask_grid ** 2, dtype=torch.bool)
    return masks


@torch.no_grad()
def test_visible_encoder_equals_dense_swin_with_masked_keys():
    model = narrow_tiny()
    shifts = {block.shift_size for stage in model.stages for layer in stage.layers for block in layer.blocks}
    assert shifts == {(0, 0), (3, 3)}
    images = torch.randn(2, 3, 224, 224, dtype=torch.float64)
    for name, mask in _masks(model, 2).items():
        ctx = swin_context(model.cfg, mask)
        x = images
        for stage, (ref, visible) in zip(model.stages, reference_stage_outputs(model, images, mask)):
            x = stage(x, ctx)
            expected = ref.flatten(1, 2)[visible.flatten(1)].view(2, -1, ref.shape[-1])
            assert x.shape == expected.shape, name
            torch.testing.assert_close(x, expected, rtol=1e-9, atol=1e-9, msg=f"mask {name}")


def test_visible_encoder_gradients_match_reference():
    model = narrow_tiny()
    images = torch.randn(2, 3, 224, 224, dtype=torch.float64)
    mask = _masks(model, 2)["per_image"]
    ctx, x = swin_context(model.cfg, mask), images
    for stage in model.stages:
        x = stage(x, ctx)
    ref, visible = reference_stage_outputs(model, images, mask)[-1]
    weights = torch.randn_like(x)
    params = [p for n, p in model.named_parameters() if ".decoder." not in n]
    got = torch.autograd.grad((x * weights).sum(), params, allow_unused=True)
    expected = torch.autograd.grad((ref[visible].view_as(x) * weights).sum(), params, allow_unused=True)
    assert sum(g is not None for g in got) > 100
    for g, e in zip(got, expected):
        assert (g is None) == (e is None)
        if g is not None:
            torch.testing.assert_close(g, e, rtol=1e-8, atol=1e-10)


def test_packing_is_dense_and_per_image_masks_work():
    model = narrow_tiny(torch.float32)
    mask = model.random_mask(3, torch.Generator().manual_seed(0))
    plans = swin_context(model.cfg, mask).plans
    assert plans[0].ids_keep.shape == (1, 12 * 64)  # one plan shared by the batch; 12 of 49 units visible
    assert all(p.fill > 0.9 for p in plans[0].packs.values())
    per_image = random_mask(3, 56, 0.75, torch.Generator().manual_seed(0), unit=8)
    plans = swin_context(model.cfg, per_image).plans
    assert plans[0].ids_keep.shape == (3, 12 * 64)
    out = model(torch.randn(3, 3, 224, 224), per_image)
    assert torch.isfinite(out.loss)


def test_swin_tiny_export_gives_timm_features():
    """The export is timm's registered Swin-T (eps 1e-5, as fine-tuning uses it); built with the preset's
    pre-training eps, 1e-6, timm's model computes the encoder's own features."""
    torch.manual_seed(0)
    model = isolocal.create_model("localmim_swin_tiny").eval()
    name, sd = isolocal.export_timm(model)
    assert name == "swin_tiny_patch4_window7_224" and isolocal.timm_kwargs(model) == {}
    eps = model.cfg.swin_norm_eps
    timm_model = timm.create_model(name, pretrained=False, num_classes=0,
                                   norm_layer=partial(torch.nn.LayerNorm, eps=eps)).eval()
    timm_model.load_state_dict(sd, strict=True)
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = timm_model.forward_features(images).flatten(1, 2)
        feats = model.encode(images)
    assert [tuple(f.shape) for f in feats] == [(1, 784, 192), (1, 196, 384), (1, 49, 768), (1, 49, 768)]
    torch.testing.assert_close(feats[-1], expected, rtol=1e-5, atol=1e-5)


def test_swin_base_export_loads_strictly():
    torch.manual_seed(0)
    model = isolocal.create_model("localmim_swin_base")
    name, sd = isolocal.export_timm(model)
    assert name == "swin_base_patch4_window7_224"
    timm_model = timm.create_model(name, pretrained=False, num_classes=0)
    timm_model.load_state_dict(sd, strict=True)
    loaded = timm_model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in sd.items())
    merge = model.stages[2].layers[0].downsample  # stage 2's tap reads after timm's layers.3 merging
    assert torch.equal(loaded["layers.3.downsample.reduction.weight"], merge.reduction.weight)
    assert torch.equal(loaded["norm.weight"], model.stages[3].norm.weight)


def test_nonstandard_swin_export_uses_kwargs():
    torch.manual_seed(0)
    model = isolocal.create_model("localmim_swin_nano").eval()
    assert isolocal.timm_kwargs(model)["in_chans"] == 1
    timm_model = isolocal.create_timm_model(model).eval()
    images = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.encode(images)[-1], timm_model.forward_features(images).flatten(1, 2))


def _grads(model, loss) -> dict[str, torch.Tensor]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in named], retain_graph=True, allow_unused=True)
    return {n: (torch.zeros_like(p) if g is None else g) for (n, p), g in zip(named, grads)}


@pytest.mark.parametrize("boundary", ["isolated", "global"])
def test_isolation_on_nano_swin(boundary):
    torch.manual_seed(0)
    model = isolocal.create_model("localmim_swin_nano", boundary=boundary)
    images = torch.randn(2, 1, 32, 32)
    out = model(images, model.random_mask(2, torch.Generator().manual_seed(0)))
    for k, loss in enumerate(out.losses):
        grads = _grads(model, loss)
        for j in range(model.num_stages):
            norm = sum(g.abs().sum() for n, g in grads.items() if model.stage_of(n) == j and ".decoder." not in n)
            if j == k or (boundary == "global" and j < k):
                assert norm > 0, (k, j)
            else:
                assert norm == 0, (k, j)


@pytest.mark.parametrize("name", [n for n in SWIN_PRESETS if "_nano" in n])
def test_nano_preset_shapes(name):
    torch.manual_seed(0)
    model = isolocal.create_model(name)
    cfg, B = model.cfg, 2
    images = torch.randn(B, cfg.in_chans, cfg.img_size, cfg.img_size)
    with torch.no_grad():
        out = model(images, model.random_mask(B, torch.Generator().manual_seed(0)), return_pred=True)
        feats = model.encode(images)
    for tap, pred, feat, target in zip(model.taps, out.preds, feats, model.target_bank(images)):
        assert pred.shape == target.shape == (B, tap.out_grid ** 2, target.shape[-1])
        assert feat.shape == (B, tap.grid ** 2, tap.dim)
    assert all(torch.isfinite(loss) and loss > 0 for loss in out.losses)


# The published LocalMIM-Swin code builds its encoder with LayerNorm(eps=1e-6); timm's Swin and SimMIM's
# use 1e-5, and so do nano (isolocal's CPU model) and the SimMIM-style presets.
EPS_1E6_PRESETS = {f"localmim_swin_{size}{pix}" for size in ("tiny", "small", "base", "large") for pix in ("", "_pix")}


def norm_kind(name: str) -> str:
    """`stages.k.norm` is tap k's norm; the others are named by their module, without indices."""
    parts = name.split(".")
    if len(parts) == 3:
        return "tap norm"
    return ".".join(parts[-2:]) if parts[-2] in ("patch_embed", "downsample") else parts[-1]


@pytest.mark.parametrize("name", SWIN_PRESETS)
def test_every_encoder_norm_of_a_swin_preset_has_the_published_eps(name):
    with torch.device("meta"):  # the modules only: no weight memory, no init
        model = StagewiseEncoder(isolocal.preset_config(name))
    norms = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    encoder = {n: m.eps for n, m in norms.items() if ".decoder." not in n}
    depths = model.cfg.depths
    assert Counter(map(norm_kind, encoder)) == {"patch_embed.norm": 1, "tap norm": model.num_stages,
                                                "norm1": sum(depths), "norm2": sum(depths),
                                                "downsample.norm": len(depths) - 1}
    assert set(encoder.values()) == {1e-6 if name in EPS_1E6_PRESETS else 1e-5}
    assert all(m.eps == 1e-6 for n, m in norms.items() if ".decoder." in n)


def test_a_checkpoint_from_before_the_published_eps_and_offsets_loads(tmp_path):
    """Older Swin HOG checkpoints saved one HOG offset per colour channel (`target_bank.bias`) and have
    no `swin_norm_eps` in their config: they load, with the eps they were trained with (1e-5) and the
    per-stage offsets rebuilt from the config."""
    torch.manual_seed(0)
    model = isolocal.create_model("localmim_swin_nano")
    state = {**model.state_dict(), "target_bank.bias": torch.zeros(model.cfg.in_chans, 2)}
    config = to_dict(RunConfig(model=dataclasses.replace(model.cfg, swin_norm_eps=1e-6)))
    del config["model"]["swin_norm_eps"]
    torch.save({"model": state, "config": config}, tmp_path / "old.pt")
    loaded = isolocal.load_checkpoint(tmp_path / "old.pt")
    assert loaded.cfg.swin_norm_eps == 1e-5 and loaded.stages[0].patch_embed.norm.eps == 1e-5
    assert torch.equal(loaded.target_bank.bias, model.target_bank.bias) and model.target_bank.bias.shape == (4, 2)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("size, dim", [("tiny", 96), ("small", 96), ("base", 128), ("large", 192)])
def test_published_swin_preset_geometry(size, dim):
    """224 px, patch 4: taps after the next patch merging (dims 2C, 4C, 8C, 8C, grids 28, 14, 7, 7),
    decoders at the tap grid (cells 8, 16, 32, 32 px); from the config alone, no weights."""
    for name in (f"localmim_swin_{size}", f"localmim_swin_{size}_pix", f"simmim_swin_{size}"):
        cfg = isolocal.preset_config(name)
        taps = isolocal.models.swin.swin_taps(cfg)
        expected = [(2 * dim, 28, 8), (4 * dim, 14, 16), (8 * dim, 7, 32), (8 * dim, 7, 32)][-len(cfg.taps):]
        assert [(t.dim, t.grid, t.cell) for t in taps] == expected, name
        assert all(t.out_grid == t.grid for t in taps), name


def test_published_swin_base_geometry():
    cfg = isolocal.preset_config("localmim_swin_base")
    model_taps = isolocal.models.swin.swin_taps(cfg)
    assert [(t.dim, t.grid, t.cell) for t in model_taps] == [(256, 28, 8), (512, 14, 16), (1024, 7, 32), (1024, 7, 32)]
    mask = random_mask(1, 56, cfg.mask_ratio, torch.Generator().manual_seed(0), cfg.mask_unit, cfg.mask_per_batch)
    assert int(mask.view(7, 8, 7, 8)[:, 0, :, 0].sum()) == 37 and cfg.mask_per_batch
    assert cfg.hog_nbins == 18 and cfg.hog_bias and cfg.decoder_dim == [64, 128, 128, 128]


def test_simmim_dense_encoder_trains_mask_token():
    torch.manual_seed(0)
    model = isolocal.create_model("simmim_swin_nano")
    assert model.num_stages == 1 and model.cfg.dense_encoder
    out = model(torch.randn(2, 1, 32, 32), model.random_mask(2, torch.Generator().manual_seed(0)))
    out.loss.backward()
    assert model.stages[0].mask_token.grad.abs().sum() > 0


@pytest.mark.parametrize("override, message", [
    ({"window_size": 6}, "window_size 6 does not tile"),
    ({"scales": [1.0, 1.0, 2.0, 1.0]}, "scales must all be 1.0"),
    ({"mask_unit": 4}, "mask_unit 4 must be a multiple of 2^3"),
    ({"taps": [0, 2], "scales": [1.0, 1.0], "decoder_dim": [64]}, "the last tap must be the last Swin stage"),
    ({"img_size": 200}, "50 tokens must be divisible by 2^3"),
    ({"stage_heads": [3, 6]}, "stage_heads must have one entry per Swin stage"),
])
def test_bad_swin_configs_are_rejected(override, message):
    with pytest.raises(ValueError, match=message.replace("^", r"\^")):
        isolocal.create_model("localmim_swin_tiny", **override)


def test_misaligned_mask_is_rejected():
    model = isolocal.create_model("localmim_swin_nano")
    mask = torch.zeros(1, 32 * 32, dtype=torch.bool)
    mask[0, 1] = True
    with pytest.raises(ValueError, match="not aligned"):
        model(torch.randn(1, 1, 32, 32), mask)
