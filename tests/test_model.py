"""The stage-split model: shapes, isolation with autograd, determinism, validation, timm export."""
import dataclasses
import math

import numpy as np
import pytest
import timm
import torch

import isolocal
from isolocal.core import targets
from isolocal.core.masking import random_mask, visible_indices
from isolocal.core.stages import cross_boundary, iter_stages
from isolocal.models.decoder import LocalDecoder, rescale_head
from isolocal.models.encoder import StagewiseEncoder
from isolocal.models.posembed import sincos_pos_embed
from isolocal.models.resnet import resnet_taps
from isolocal.models.swin import swin_taps
from isolocal.models.vit import vit_taps
from isolocal.core.targets import target_dim
from isolocal.train.step import backward_step, is_stagewise


def batch(model, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(b, model.cfg.in_chans, model.img_size, model.img_size, generator=g)
    return images, model.random_mask(b, generator=g)


SMALL_VIT_PRESETS = [n for n in isolocal.list_models() if "_vit_" in n and ("nano" in n or "micro" in n)]


@pytest.mark.parametrize("name", SMALL_VIT_PRESETS)
def test_small_vit_presets_predict_one_target_per_cell(name):
    model = isolocal.create_model(name)
    images, mask = batch(model)
    out = model(images, mask, return_pred=True)
    assert len(out.losses) == model.num_stages == len(model.cfg.taps)
    assert all(torch.isfinite(loss) and loss > 0 for loss in out.losses)
    for tap, pred, target in zip(model.taps, out.preds, model.target_bank(images)):
        assert pred.shape == target.shape == (2, tap.out_grid ** 2, target.shape[-1])


# Published geometry (docs/method.md): taps after blocks 2, 4, depth-2, depth; scales x4, x2, x1, x0.5 of the
# 14x14 token grid, i.e. target cells of 4, 8, 16, 32 px; HOG with 18 bins and the bias for ViT-L only.
# (tap blocks, output grids, cells, target dims); checked from the config alone, no weights, no forward.
LARGE_VIT_GEOMETRY = {
    "localmim_vit_tiny": ([1, 3, 9, 11], [56, 28, 14, 7], [4, 8, 16, 32], [27] * 4),
    "localmim_vit_base": ([1, 3, 9, 11], [56, 28, 14, 7], [4, 8, 16, 32], [27] * 4),
    "localmim_vit_large": ([1, 3, 21, 23], [56, 28, 14, 7], [4, 8, 16, 32], [54] * 4),
    "mae_vit_large": ([23], [14], [16], [16 * 16 * 3]),
    "maskfeat_vit_large": ([23], [14], [16], [27]),
}


@pytest.mark.parametrize("name", sorted(LARGE_VIT_GEOMETRY))
def test_large_vit_preset_geometry(name):
    cfg = isolocal.preset_config(name)
    taps = vit_taps(cfg)
    blocks, grids, cells, dims = LARGE_VIT_GEOMETRY[name]
    assert [t.index for t in taps] == blocks and [t.out_grid for t in taps] == grids
    assert [t.cell for t in taps] == cells and all(t.dim == cfg.embed_dim and t.grid == 14 for t in taps)
    assert [target_dim(cfg.target, t.cell, cfg.in_chans, cfg.hog_nbins) for t in taps] == dims
    assert cfg.hog_bias == (name == "localmim_vit_large")
    StagewiseEncoder.check_config(cfg)


def test_every_preset_tiles_the_image_at_every_tap():
    for name in isolocal.list_models():
        cfg = isolocal.preset_config(name)
        StagewiseEncoder.check_config(cfg)
        taps = {"vit": vit_taps, "swin": swin_taps, "resnet": resnet_taps}[cfg.arch](cfg)
        assert all(t.out_grid * t.cell == cfg.img_size for t in taps), name
        assert [t.index for t in taps] == cfg.taps, name


def test_published_vit_b_geometry():
    model = isolocal.create_model("localmim_vit_base")
    assert [t.index for t in model.taps] == [1, 3, 9, 11]
    assert [t.out_grid for t in model.taps] == [56, 28, 14, 7]
    assert [t.cell for t in model.taps] == [4, 8, 16, 32]
    assert [len(s.blocks) for s in model.stages] == [2, 2, 6, 2]


def test_weights_start_from_maes_init():
    """Xavier-uniform linears with zero biases, the patch projection's weight xavier-uniform as a
    linear (its bias keeps PyTorch's default, as in MAE), N(0, 0.02) CLS and mask tokens."""
    torch.manual_seed(0)
    for name in ("localmim_vit_nano", "simmim_swin_nano"):
        model = isolocal.create_model(name)
        linears = [(n, m.weight, m.bias) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        embed = model.stages[0].patch_embed.proj
        linears.append(("patch_embed", embed.weight.flatten(1), None))
        for n, w, b in linears:
            bound = math.sqrt(6 / (w.shape[0] + w.shape[1]))
            assert w.abs().max() <= bound and w.std() > 0.9 * bound / math.sqrt(3), n  # U(-a, a): std a/sqrt(3)
            assert b is None or torch.count_nonzero(b) == 0, n
        tokens = [p for n, p in model.named_parameters() if n.endswith(("cls_token", "mask_token"))]
        assert len(tokens) == (1 + 4 if name == "localmim_vit_nano" else 1 + 1)
        assert all(0.01 < t.std() < 0.03 for t in tokens), [t.std() for t in tokens]


def test_rescale_heads_follow_the_published_design():
    """x2^n: n transposed convolutions (kernel 2, stride 2) halving the channels, channel LayerNorm +
    GELU between them; x1: only the 1x1 projection; x2^-n: average pooling first."""
    def layers(head):
        return [(type(m).__name__, getattr(m, "out_channels", None)) for m in head]

    assert layers(rescale_head(64, 4.0, 27)) == [("ConvTranspose2d", 32), ("LayerNorm2d", None), ("GELU", None),
                                                 ("ConvTranspose2d", 16), ("Conv2d", 27)]
    assert layers(rescale_head(64, 2.0, 27)) == [("ConvTranspose2d", 32), ("Conv2d", 27)]
    assert layers(rescale_head(64, 1.0, 27)) == [("Conv2d", 27)]
    pool = rescale_head(64, 0.25, 27)
    assert layers(pool) == [("AvgPool2d", None), ("Conv2d", 27)] and pool[0].kernel_size == pool[0].stride == 4
    assert all(m.kernel_size == (2, 2) and m.stride == (2, 2) for m in rescale_head(64, 4.0, 27)[::3])


@pytest.mark.parametrize("has_cls", [True, False])
def test_decoder_places_visible_tokens_and_mask_tokens_by_position(has_cls):
    """The decoder written out: embed, each visible token at its own grid position (read from the
    mask), the mask token everywhere else, fixed positions added, blocks, norm, prefix dropped, the
    grid through the rescale head, cells in raster order."""
    torch.manual_seed(0)
    kwargs = {} if has_cls else {"has_cls": False}
    dec = LocalDecoder(16, 32, 1, 2, 4.0, grid=4, scale=2.0, out_dim=5, **kwargs).eval()
    assert 0.005 < dec.mask_token.std() < 0.05 and not dec.pos_embed.requires_grad
    assert all(n.eps == 1e-6 for n in dec.modules() if isinstance(n, torch.nn.LayerNorm))
    assert all(b.attn.qkv.bias is not None for b in dec.blocks)
    mask = random_mask(2, 4, 0.75, torch.Generator().manual_seed(0))
    x = torch.randn(2, int(has_cls) + 4, 16)
    with torch.no_grad():
        got = dec(x, visible_indices(mask)[1])
        e = dec.embed(x)
        grid = dec.mask_token.expand(2, 16, 32).clone()
        for b in range(2):
            grid[b, (~mask[b]).nonzero().flatten()] = e[b, int(has_cls):]
        seq = torch.cat([e[:, :int(has_cls)], grid], 1) + sincos_pos_embed(32, 4, cls_token=has_cls)
        y = dec.norm(dec.blocks(seq))[:, int(has_cls):]
        expected = dec.head(y.transpose(1, 2).reshape(2, 32, 4, 4)).flatten(2).transpose(1, 2)
    assert got.shape == (2, 64, 5)
    torch.testing.assert_close(got, expected)


def test_outputs_predictions_only_on_request_and_features_per_stage():
    model = isolocal.create_model("localmim_vit_nano")
    images, mask = batch(model)
    assert model(images, mask).preds is None
    assert torch.isfinite(model(images[:1], mask[:1]).loss)  # a batch of one image is a batch
    assert len(model(images, mask, return_pred=True).preds) == model.num_stages
    feats = model.encode(images)
    assert [f.shape for f in feats] == [(2, 1 + 64, 64)] * model.num_stages


# ------------------------------------------------------------------------------ the masked loss

def hand_weights(mask: torch.Tensor, grid: int, img_size: int, out_grid: int) -> torch.Tensor:
    """Fraction of each output cell's pixels that lie under masked tokens, from a pixel-level mask."""
    token_px, cell_px = img_size // grid, img_size // out_grid
    pixels = np.kron(mask.view(-1, grid, grid).numpy().astype(np.float64), np.ones((1, token_px, token_px)))
    B = mask.shape[0]
    w = np.zeros((B, out_grid * out_grid))
    for b in range(B):
        for i in range(out_grid):
            for j in range(out_grid):
                w[b, i * out_grid + j] = pixels[b, i * cell_px:(i + 1) * cell_px, j * cell_px:(j + 1) * cell_px].mean()
    return torch.from_numpy(w)


def hand_targets(model, images: torch.Tensor) -> list[torch.Tensor]:
    cfg = model.cfg
    if cfg.target == "pixels":
        return [targets.pixels(images, t.cell) for t in model.taps]
    bias = targets.hog_bias(len(model.taps), cfg.hog_bias_seed) if cfg.hog_bias else [None] * len(model.taps)
    return [targets.hog(images, t.cell, cfg.hog_nbins, b) for t, b in zip(model.taps, bias)]


def hand_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> float:
    """sum over cells of weight * mean over features of the squared error, over the sum of weights."""
    err = ((pred.double() - target.double()) ** 2).mean(-1)
    return float((err * weight).sum() / weight.sum())


def add_at(model, k: int, cells: torch.Tensor, amount: float):
    """A forward hook adding `amount` to stage k's predictions where `cells` (B, cells) is True."""
    return model.stages[k].decoder.register_forward_hook(
        lambda module, args, out: out + amount * cells.unsqueeze(-1).to(out.dtype))


# (preset, overrides): ViT with a pooled (x0.5) top tap, MAE pixels, Swin (HOG with bias, one mask
# per batch) and a dense Swin whose 2x2-token mask units are pooled 8x8 into the top tap's cells.
LOSS_CASES = [("localmim_vit_nano", {}), ("mae_vit_nano", {}), ("localmim_swin_nano", {}),
              ("simmim_swin_nano", {"mask_unit": 2})]


@pytest.mark.parametrize("name, overrides", LOSS_CASES)
def test_loss_is_the_weighted_mse_over_masked_cells(name, overrides):
    torch.manual_seed(0)
    model = isolocal.create_model(name, **overrides)
    images, mask = batch(model, b=3)
    grid = model.cfg.img_size // model.cfg.patch_size
    weights = [hand_weights(mask, grid, model.cfg.img_size, t.out_grid) for t in model.taps]
    if name in ("localmim_vit_nano", "simmim_swin_nano"):
        w = weights[-1]
        assert ((w > 0) & (w < 1)).any()  # the case this preset is here for: fractional weights
    with torch.no_grad():
        out = model(images, mask, return_pred=True)
        assert len(out.losses) == len(out.preds) == len(weights) == model.num_stages
        for loss, pred, target, w in zip(out.losses, out.preds, hand_targets(model, images), weights):
            assert loss.item() == pytest.approx(hand_loss(pred, target, w), rel=1e-5)
        # Predictions at cells with no masked pixel do not enter the loss; at masked cells they do.
        hooks = [add_at(model, k, w == 0, 100.0) for k, w in enumerate(weights)]
        visible_changed = model(images, mask).losses
        for h in hooks:
            h.remove()
        hooks = [add_at(model, k, w > 0, 100.0) for k, w in enumerate(weights)]
        masked_changed = model(images, mask).losses
        for h in hooks:
            h.remove()
    for k, (a, b, c) in enumerate(zip(out.losses, visible_changed, masked_changed)):
        assert torch.allclose(a, b, rtol=1e-6, atol=0), k
        assert c > 100 * a, k


# ------------------------------------------------------------------------------ gradients

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
            if model.stage_of(name) != k:  # not even reached: the stream is detached, no graph crosses
                assert grad is None, name
            elif ".blocks." in name and "decoder" not in name:
                assert grad is not None and torch.count_nonzero(grad) > 0, name


def param_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["localmim_vit_nano", "localmim_swin_nano"])
def test_stagewise_isolated_step_gives_the_gradients_of_the_summed_loss(name):
    """backward_step's stage-by-stage backward (each stage's graph freed before the next is built)
    equals one backward of the summed loss under boundary='isolated', parameter by parameter; with
    accumulation the gradients and losses are divided by it, and `scale` multiplies the gradients."""
    torch.manual_seed(0)
    model = isolocal.create_model(name, boundary="isolated")
    images, mask = batch(model, b=3)
    out = model(images, mask)
    out.loss.backward()
    expected = param_grads(model)
    assert {model.stage_of(n) for n in expected} == set(range(model.num_stages))
    model.zero_grad(set_to_none=True)
    losses = backward_step(model, images, mask)
    got = param_grads(model)
    assert got.keys() == expected.keys()
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-5, atol=1e-8, msg=n)
    torch.testing.assert_close(losses, torch.stack(out.losses).detach())
    assert not losses.requires_grad  # no graph kept alive by what the caller logs
    model.zero_grad(set_to_none=True)
    losses = backward_step(model, images, mask, scale=lambda loss: 3.0 * loss, accum=4)
    torch.testing.assert_close(losses, torch.stack(out.losses).detach() / 4)
    for n, g in param_grads(model).items():
        torch.testing.assert_close(g, expected[n] * 0.75, rtol=1e-5, atol=1e-8, msg=n)


def test_stagewise_backward_is_used_exactly_when_isolated_with_several_stages():
    two = isolocal.create_model("localmim_vit_nano", taps=[1, 3], scales=[1.0, 0.5], boundary="isolated")
    assert two.num_stages == 2 and is_stagewise(two)
    assert is_stagewise(isolocal.create_model("localmim_vit_nano", boundary="isolated"))
    assert not is_stagewise(isolocal.create_model("localmim_vit_nano", boundary=["isolated", 0.5, "isolated"]))
    assert not is_stagewise(isolocal.create_model("localmim_vit_nano", boundary="global"))


def test_global_step_divides_by_accum_and_scales():
    torch.manual_seed(0)
    model = isolocal.create_model("localmim_vit_nano", boundary="global")
    images, mask = batch(model)
    out = model(images, mask)
    out.loss.backward()
    expected = param_grads(model)
    model.zero_grad(set_to_none=True)
    losses = backward_step(model, images, mask, scale=lambda loss: 3.0 * loss, accum=4)
    torch.testing.assert_close(losses, torch.stack(out.losses).detach() / 4)
    assert not losses.requires_grad
    got = param_grads(model)
    assert got.keys() == expected.keys()
    for n, g in got.items():
        torch.testing.assert_close(g, expected[n] * 0.75, rtol=1e-5, atol=1e-8, msg=n)


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


def test_the_stage_loop_crosses_each_boundary_and_yields_before_the_next_stage_runs():
    """`iter_stages`, the loop of every runner: stage k > 0 reads stage k-1's output across boundary
    alphas[k-1] (0 detaches, 0.5 halves the gradient), and a caller gets each stage's loss before the
    next stage runs, so it can back-propagate it there (the stage-wise isolated step)."""
    w = [torch.tensor(float(k + 2), requires_grad=True) for k in range(3)]  # stage k: y = x * (k + 2)
    ran = []

    def run(k, x):
        ran.append(k)
        y = x * w[k]
        return y, y.sum(), y.detach()

    x = torch.ones(2, requires_grad=True)
    grads = []
    for stage in iter_stages(run, x, [0.0, 0.5], range(3)):
        assert ran == list(range(stage.index + 1))
        grads.append(torch.autograd.grad(stage.loss, [x, *w], allow_unused=True, retain_graph=True))
    assert [stage.loss.item() for stage in iter_stages(run, x.detach(), [0.0, 0.5], range(3))] == [4.0, 12.0, 48.0]
    assert [[None if g is None else float(g.sum()) for g in gs] for gs in grads] == [
        [4.0, 2.0, None, None],  # d(2 x)/dx, d/dw0 = sum(x)
        [None, None, 4.0, None],  # detached: only w1 (d/dw1 = sum(2 x))
        [None, None, 8.0, 12.0],  # halved: d/dw1 = 0.5 * 4 * 4; d/dw2 = sum(6 x)
    ]


def test_a_received_isolated_boundary_passes_zero_gradient_instead_of_detaching():
    """A pipeline rank's first stage under DeepSpeed's default schedule: the received tensor needs a gradient
    (zeros), so the isolated boundary in front of it is a zero scale, not a detach; inside a rank, and for a
    received tensor that needs no gradient (the isolated schedule), it detaches."""
    def run(k, x):
        return x * 2, (x * 2).sum(), None

    y = torch.ones(3, requires_grad=True)
    first, second = iter_stages(run, y, [0.0, 0.0], [1, 2], received=True)
    (grad,) = torch.autograd.grad(first.loss, y)
    assert torch.equal(grad, torch.zeros(3))
    assert not second.output.requires_grad
    (inside,) = iter_stages(run, y, [0.0], [1])
    assert not inside.output.requires_grad
    assert not cross_boundary(y.detach(), 0.0, received=True).requires_grad
    assert cross_boundary(y, 1.0, received=True) is y
    assert not cross_boundary(y, 0.0).requires_grad  # by default x comes from this process: detached


def test_the_models_stage_loop_from_a_later_stage_detaches_its_input_in_process():
    """`stages_of` started at stage 1 on an input that needs a gradient: without `received` (a caller in this
    process) the isolated boundary detaches, so the stage's loss has no gradient for that input."""
    model = isolocal.create_model("localmim_vit_nano", boundary="isolated")
    images, mask = batch(model)
    prepared = model.prepare(images, mask)
    x = model.stage_step(0, images, prepared)[0]
    (stage,) = model.stages_of(x, prepared, stages=[1])
    assert torch.autograd.grad(stage.loss, x, allow_unused=True) == (None,)


def test_only_reconstructing_stages_get_targets():
    """`prepare` computes a target for each asked-for stage whose head reconstructs, and for no other."""
    mixed = isolocal.create_model("localmim_vit_nano", objective=["mim", "classify", "mim", "classify"])
    images, mask = batch(mixed)
    labels = torch.zeros(2, dtype=torch.long)
    present = lambda prepared: [t is not None for t in prepared.targets]  # noqa: E731
    assert present(mixed.prepare(images, mask, labels=labels)) == [True, False, True, False]
    assert present(mixed.prepare(images, mask, [1, 2], labels=labels)) == [False, False, True, False]
    mim = isolocal.create_model("localmim_vit_nano")
    assert present(mim.prepare(images, mask)) == [True] * 4
    assert present(mim.prepare(images, mask, [1, 2])) == [False, True, True, False]


def test_same_weights_images_mask_give_identical_losses():
    torch.manual_seed(0)
    a = isolocal.create_model("localmim_vit_nano")
    b = isolocal.create_model("localmim_vit_nano", boundary="isolated")
    b.load_state_dict(a.state_dict())
    images, mask = batch(a)
    la, lb = a(images, mask).losses, b(images, mask).losses
    assert all(torch.equal(x, y) for x, y in zip(la, lb))


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
    ({"mask_ratio": 0.0}, r"mask_ratio must be in \(0, 1\), got 0.0"),
    ({"img_size": 0}, "img_size must be >= 1, got 0"),
    ({"in_chans": 0}, "in_chans must be >= 1, got 0"),
    ({"hog_nbins": 0}, "hog_nbins must be >= 1, got 0"),
    ({"decoder_depth": 0}, "decoder_depth must be >= 1, got 0"),
    ({"taps": [], "scales": []}, "taps must list at least one block"),
    ({"taps": [1, 0, 2, 3]}, "increasing"),
    ({"taps": [0, 1, 1, 3]}, "increasing"),
    ({"decoder_dim": [64, 64]}, r"decoder_dim must have 1 entry or one per tap \(4\), got \[64, 64\]"),
    ({"decoder_dim": [64, 63, 64, 64]}, r"decoder_dim 63 must be divisible by scales\[1\] = 2.0"),
    ({"scales": [4.0, 2.0, 1.0, 0.0]}, r"model.scales entries must be > 0, got \[4.0, 2.0, 1.0, 0.0\]"),
    ({"img_size": 24, "scales": [4.0, 2.0, 1.0, 0.25]}, "non-integer output grid 6 x 0.25 = 1.5"),
    ({"img_size": 24, "patch_size": 6}, "target cell of 1.5 px"),
    ({"target": "sift"}, "target"),
    ({"boundary": "detached"}, "boundary"),
    ({"boundary": 1.5}, "boundary"),
    ({"arch": "convnet"}, "arch"),
])
def test_bad_configs_are_clear_errors_at_build(overrides, message):
    with pytest.raises(ValueError, match=message):
        isolocal.create_model("localmim_vit_nano", **overrides)


def test_config_checks_run_without_building():
    cfg = isolocal.preset_config("localmim_vit_nano")
    cfg.boundary = "detached"
    with pytest.raises(ValueError, match="boundary 'detached' is not valid"):
        StagewiseEncoder.check_config(cfg)
    cfg.boundary = ["isolated", 0.5]
    with pytest.raises(ValueError, match=r"one entry per boundary \(3\), got 2"):
        StagewiseEncoder.check_config(cfg)
    cfg.boundary, cfg.target = ["isolated", 0.5, "global"], "sift"
    with pytest.raises(ValueError, match="model.target must be hog or pixels, got 'sift'"):
        StagewiseEncoder.check_config(cfg)


def test_mask_settings_are_checked_before_a_run():
    cfg = dataclasses.replace(isolocal.preset_config("localmim_vit_nano"), mask_unit=3)
    with pytest.raises(ValueError, match="mask_unit 3 must be >= 1 and divide the token grid 8"):
        StagewiseEncoder.check_masking(cfg)
    StagewiseEncoder.check_masking(isolocal.preset_config("localmim_swin_nano"))


def test_edge_configs_that_are_valid():
    """Numeric boundaries 0 and 1 (as int or float), a tap whose single output cell is the image, and
    the smallest image size and bin count the checks accept."""
    model = isolocal.create_model("localmim_vit_nano", boundary=[0, 1.0, 0.0], scales=[4.0, 2.0, 1.0, 0.125])
    assert model.alphas == [0.0, 1.0, 0.0] and (model.taps[-1].out_grid, model.taps[-1].cell) == (1, 32)
    for overrides in ({"img_size": 1, "patch_size": 1, "scales": [1.0] * 4}, {"hog_nbins": 1}):
        StagewiseEncoder.check_config(dataclasses.replace(isolocal.preset_config("localmim_vit_nano"), **overrides))


def test_unknown_preset_and_field_name_the_value():
    with pytest.raises(ValueError, match="unknown preset 'vit_huge'"):
        isolocal.create_model("vit_huge")
    with pytest.raises(ValueError, match="unknown config key depthh"):
        isolocal.create_model("localmim_vit_nano", depthh=3)
    with pytest.raises(ValueError, match=r"mask must have shape \(2, 64\)"):
        model = isolocal.create_model("localmim_vit_nano")
        model(torch.zeros(2, 1, 32, 32), torch.zeros(2, 16, dtype=torch.bool))


def test_a_mask_with_another_visible_count_is_refused():
    """The encoder keeps the config's count of visible tokens (16 of 64 at ratio 0.75); a mask with
    another count must fail, not silently drop visible tokens (all visible: refused at the entry)."""
    model = isolocal.create_model("localmim_vit_nano")
    with pytest.raises(ValueError, match="at least one visible .* and one masked"):
        model(torch.zeros(2, 1, 32, 32), torch.zeros(2, 64, dtype=torch.bool))
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[:, :8] = True  # 56 visible
    with pytest.raises(RuntimeError, match="16 visible"):
        model(torch.zeros(2, 1, 32, 32), mask)


def test_model_is_a_plain_module_and_keeps_its_former_names():
    assert isinstance(isolocal.create_model("mae_vit_nano"), StagewiseEncoder)
    assert isolocal.LocalMIM is StagewiseEncoder and isolocal.MIMOutput is isolocal.StageOutput
