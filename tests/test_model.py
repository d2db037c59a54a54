"""The stage-split model: shapes, isolation with autograd, determinism, validation, timm export."""
import pytest
import timm
import torch

import isolocal
from isolocal.models.mim import LocalMIM


def batch(model, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(b, model.cfg.in_chans, model.img_size, model.img_size, generator=g)
    return images, model.random_mask(b, generator=g)


VIT_PRESETS = [n for n in isolocal.list_models() if "_vit_" in n]


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if "large" in n else n for n in VIT_PRESETS])
def test_every_vit_preset_gives_per_stage_losses_with_the_right_shapes(name):
    small = "nano" in name or "micro" in name
    model = isolocal.create_model(name) if small else isolocal.create_model(name, img_size=64)
    images, mask = batch(model)
    out = model(images, mask, return_pred=True)
    assert len(out.losses) == model.num_stages == len(model.cfg.taps)
    assert torch.isfinite(out.loss) and torch.allclose(out.loss, sum(out.losses))
    for tap, pred, target in zip(model.taps, out.preds, model.target_bank(images)):
        assert pred.shape == target.shape == (2, tap.out_grid ** 2, target.shape[-1])


def test_published_vit_b_geometry():
    model = isolocal.create_model("localmim_vit_base")
    assert [t.index for t in model.taps] == [1, 3, 9, 11]
    assert [t.out_grid for t in model.taps] == [56, 28, 14, 7]
    assert [t.cell for t in model.taps] == [4, 8, 16, 32]
    assert all(len(s.blocks) for s in model.stages) and sum(len(s.blocks) for s in model.stages) == 12


def stage_grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_isolated_stage_loss_touches_only_its_own_stage():
    model = isolocal.create_model("localmim_vit_nano", boundary="isolated")
    images, mask = batch(model)
    for k in range(model.num_stages):
        grads = stage_grads(model, model(images, mask).losses[k])
        for name, grad in grads.items():
            if model.stage_of(name) != k:
                assert grad is None or torch.count_nonzero(grad) == 0, name
            elif ".blocks." in name and "decoder" not in name:
                assert grad is not None and torch.count_nonzero(grad) > 0, name


def test_global_upper_losses_reach_lower_stages():
    model = isolocal.create_model("localmim_vit_nano", boundary="global")
    images, mask = batch(model)
    grads = stage_grads(model, model(images, mask).losses[-1])
    for k in range(model.num_stages - 1):
        lower = [g for n, g in grads.items() if model.stage_of(n) == k and ".blocks." in n and "decoder" not in n]
        assert lower and all(g is not None and torch.count_nonzero(g) > 0 for g in lower)


def test_scaled_boundary_multiplies_cross_boundary_gradient_by_alpha():
    model = isolocal.create_model("localmim_vit_nano", boundary="global")
    images, mask = batch(model)
    full = stage_grads(model, model(images, mask).losses[1])
    model.set_boundary([0.3, 1.0, 1.0])
    scaled = stage_grads(model, model(images, mask).losses[1])
    for name, g in full.items():
        if g is None:
            continue
        expected = g * 0.3 if model.stage_of(name) == 0 else g
        assert torch.allclose(scaled[name], expected, rtol=1e-5, atol=1e-8), name
    scaled_loss = model(images, mask).loss
    model.set_boundary("global")
    assert torch.equal(scaled_loss, model(images, mask).loss)  # the policy never changes the forward


def test_same_weights_images_mask_give_identical_losses():
    torch.manual_seed(0)
    a = isolocal.create_model("localmim_vit_nano")
    b = isolocal.create_model("localmim_vit_nano", boundary="isolated")
    b.load_state_dict(a.state_dict())
    images, mask = batch(a)
    la, lb = a(images, mask).losses, b(images, mask).losses
    assert all(torch.equal(x, y) for x, y in zip(la, lb))
    assert torch.equal(a(images, mask).loss, a(images, mask).loss)


def test_same_seed_same_mask():
    model = isolocal.create_model("localmim_vit_nano")
    m1 = model.random_mask(4, generator=torch.Generator().manual_seed(7))
    m2 = model.random_mask(4, generator=torch.Generator().manual_seed(7))
    assert torch.equal(m1, m2) and m1.dtype == torch.bool


def test_vit_b_exports_to_timm_with_identical_features():
    model = isolocal.create_model("localmim_vit_base").eval()
    name, sd = isolocal.export_timm(model)
    assert name == "vit_base_patch16_224"
    reference = timm.create_model(name, pretrained=False, num_classes=0).eval()
    encoder_params = sum(p.numel() for p in model.stages.parameters()) - sum(
        p.numel() for k, s in enumerate(model.stages) for m in ([s.decoder] + ([s.norm] if k < 3 else []))
        for p in m.parameters())
    assert encoder_params == sum(p.numel() for p in reference.parameters())
    reference.load_state_dict(sd, strict=True)
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(reference.forward_features(images), model.encode(images)[-1])


def test_small_config_exports_through_timm_kwargs():
    model = isolocal.create_model("localmim_vit_nano").eval()
    timm_model = isolocal.create_timm_model(model).eval()
    images = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(timm_model.forward_features(images), model.encode(images)[-1], atol=1e-6)


@pytest.mark.parametrize("overrides, message", [
    ({"img_size": 30}, "divisible by patch_size"),
    ({"taps": [0, 5, 2, 3]}, "increasing"),
    ({"taps": [0, 1, 2, 9]}, r"\[0, 3\]"),
    ({"taps": [0, 1, 2]}, "one entry per tap"),
    ({"taps": [0, 1, 2], "scales": [1.0, 1.0, 1.0]}, "last tap"),
    ({"scales": [3.0, 2.0, 1.0, 0.5]}, "power of two"),
    ({"scales": [8.0, 2.0, 1.0, 0.5]}, "target cell"),
    ({"scales": [4.0, 2.0, 1.0, 0.0625]}, "non-integer output grid"),
    ({"mask_ratio": 1.0}, "mask_ratio"),
    ({"target": "sift"}, "target"),
    ({"boundary": "detached"}, "boundary"),
    ({"boundary": 1.5}, "boundary"),
    ({"arch": "convnet"}, "arch"),
])
def test_bad_configs_are_clear_errors_at_build(overrides, message):
    with pytest.raises(ValueError, match=message):
        isolocal.create_model("localmim_vit_nano", **overrides)


def test_unknown_preset_and_field_name_the_value():
    with pytest.raises(ValueError, match="unknown preset 'vit_huge'"):
        isolocal.create_model("vit_huge")
    with pytest.raises(ValueError, match="unknown config key depthh"):
        isolocal.create_model("localmim_vit_nano", depthh=3)
    with pytest.raises(ValueError, match=r"mask must have shape \(2, 64\)"):
        model = isolocal.create_model("localmim_vit_nano")
        model(torch.zeros(2, 1, 32, 32), torch.zeros(2, 16, dtype=torch.bool))


def test_model_is_a_plain_module():
    assert isinstance(isolocal.create_model("mae_vit_nano"), LocalMIM)
