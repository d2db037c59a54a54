"""Tests for the attention analysis package: capture, NMI, attention distance, figures."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from matplotlib.image import imread
from scipy.spatial.distance import pdist
from skimage.data import astronaut
from skimage.transform import resize
from timm.models.vision_transformer import Block
from torch import nn

import analysis
from analysis import metrics
from analysis.capture import token_layout

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def tiny_vit(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=0, pretrained=False, **kwargs
    )


def with_cls(patch_attn: torch.Tensor) -> torch.Tensor:
    """Embed patch attention (B, H, N, N) into (B, H, N+1, N+1) with a CLS token that gets no mass."""
    b, h, n, _ = patch_attn.shape
    full = torch.zeros(b, h, n + 1, n + 1, dtype=patch_attn.dtype)
    full[:, :, 0] = 1.0 / (n + 1)
    full[:, :, 1:, 1:] = patch_attn
    return full


def numpy_nmi(attn: np.ndarray) -> np.ndarray:
    """Direct loop over images, heads, queries and keys of docs/method.md §8 (CLS at index 0)."""
    b, h = attn.shape[:2]
    out = np.zeros((b, h))
    for i in range(b):
        for j in range(h):
            a = attn[i, j, 1:, 1:].astype(np.float64) + 1e-8
            a = a / a.sum(axis=1, keepdims=True)
            n = a.shape[0]
            p_k = np.array([sum(a[q, k] / n for q in range(n)) for k in range(n)])
            mi = sum(a[q, k] / n * np.log(a[q, k] / p_k[k]) for q in range(n) for k in range(n))
            h_k = -sum(p * np.log(p) for p in p_k)
            out[i, j] = mi / np.sqrt(np.log(n) * h_k)
    return out.mean(axis=0)


def test_nmi_uniform_is_zero():
    n = 16
    attn = with_cls(torch.full((2, 3, n, n), 1.0 / n))
    assert torch.allclose(analysis.nmi(attn), torch.zeros(3, dtype=torch.float64), atol=1e-6)


def test_nmi_permutation_is_one():
    n = 16
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(n, generator=g)
    one_hot = torch.eye(n)[perm].expand(2, 3, n, n)
    assert torch.allclose(analysis.nmi(with_cls(one_hot)), torch.ones(3, dtype=torch.float64), atol=1e-4)


def test_nmi_matches_numpy_loop():
    g = torch.Generator().manual_seed(1)
    attn = (torch.randn(2, 3, 10, 10, generator=g) * 2).softmax(dim=-1)
    got = analysis.nmi(attn).numpy()
    assert got.shape == (3,)
    np.testing.assert_allclose(got, numpy_nmi(attn.numpy()), atol=1e-6, rtol=0)


def test_attention_distance_identity_and_uniform():
    grid, patch = (3, 4), 8
    n = grid[0] * grid[1]
    identity = with_cls(torch.eye(n).expand(2, 2, n, n))
    assert torch.allclose(analysis.attention_distance(identity, grid, patch), torch.zeros(2, dtype=torch.float64), atol=1e-5)

    centres = np.array([((r + 0.5) * patch, (c + 0.5) * patch) for r in range(grid[0]) for c in range(grid[1])])
    mean_pairwise = 2 * pdist(centres).sum() / n**2  # includes the zero self-distances, as uniform rows do
    uniform = with_cls(torch.full((2, 2, n, n), 1.0 / n))
    got = analysis.attention_distance(uniform, grid, patch)
    np.testing.assert_allclose(got.numpy(), np.full(2, mean_pairwise), rtol=1e-6)


def test_attention_distance_matches_a_loop_and_centres_are_mid_patch():
    """Per head: mean over images and queries of sum_k A[q, k] * ||centre(q) - centre(k)||, centres at
    ((row + 0.5) * patch_h, (col + 0.5) * patch_w); 2 images and 3 heads, so the axes cannot be swapped."""
    grid, patch = (2, 3), (4, 8)
    centres = metrics.patch_centres(grid, patch)
    assert centres.tolist() == [[2.0, 4.0], [2.0, 12.0], [2.0, 20.0], [6.0, 4.0], [6.0, 12.0], [6.0, 20.0]]
    g = torch.Generator().manual_seed(0)
    attn = (torch.randn(2, 3, 7, 7, generator=g) * 3).softmax(-1)
    a = attn[:, :, 1:, 1:].double().numpy() + 1e-8
    a /= a.sum(-1, keepdims=True)
    c = centres.numpy()
    expected = [np.mean([sum(a[b, h, q, k] * np.hypot(*(c[q] - c[k])) for k in range(6)) for b in range(2) for q in range(6)])
                for h in range(3)]
    np.testing.assert_allclose(analysis.attention_distance(attn, grid, patch).numpy(), expected, rtol=1e-10)
    table = analysis.layout_table([attn, attn], [analysis.TokenLayout(1, grid, patch)] * 2)
    assert table["attention_distance_heads"][1] == pytest.approx(expected)
    assert table["nmi_heads"][0] == pytest.approx(analysis.nmi(attn).tolist())
    with pytest.raises(ValueError):  # one layout per layer
        analysis.layout_table([attn, attn], [analysis.TokenLayout(1, grid, patch)])
    assert metrics.patch_attention(attn).shape == (2, 3, 6, 6)  # one prefix token by default


def reference_attention(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """Unfused attention read from the attn_drop input: acceptable only as a test reference."""
    captured = []
    handles = []
    for blk in model.blocks:
        blk.attn.fused_attn = False
        handles.append(blk.attn.attn_drop.register_forward_hook(lambda m, args, out: captured.append(args[0].clone())))
    with torch.no_grad():
        model.forward_features(images)
    for handle in handles:
        handle.remove()
    for blk in model.blocks:
        blk.attn.fused_attn = True
    return captured


@pytest.mark.parametrize("qk_norm", [False, True])
def test_capture_fused_matches_unfused_reference(qk_norm):
    model = tiny_vit(qk_norm=qk_norm).eval()
    for blk in model.blocks:
        blk.attn.fused_attn = True
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    got = analysis.capture_attention(model, images)
    ref = reference_attention(model, images)
    assert len(got) == len(ref) == 2
    for a, r in zip(got, ref):
        assert a.dtype == torch.float32 and a.shape == (2, 3, 17, 17)
        torch.testing.assert_close(a, r, atol=1e-5, rtol=0)
        torch.testing.assert_close(a.sum(-1), torch.ones(2, 3, 17))

    only_second = analysis.capture_attention(model, images, layers=[2])
    torch.testing.assert_close(only_second[0], got[1])


def test_capture_reads_bf16_modules_in_fp32():
    """A bf16 model's attention is computed from its bf16 q and k, upcast: fp32 logits and softmax."""
    model = tiny_vit().eval().bfloat16()
    images = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)).bfloat16()
    inputs = []
    model.blocks[0].attn.register_forward_hook(lambda m, args, out: inputs.append(args[0]))
    (got, _) = analysis.capture_attention(model, images)
    attn = model.blocks[0].attn
    q, k = attn.qkv(inputs[0]).reshape(1, 17, 3, 3, 64).permute(2, 0, 3, 1, 4)[:2]
    expected = ((q.float() @ k.float().transpose(-2, -1)) * attn.scale).softmax(-1)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_capture_of_a_bare_attention_module_and_what_it_refuses():
    """Called as m(x) or m(x=x) it is captured; with a mask (keyword or positional) or causal, it is
    refused: the captured softmax would not be the attention that ran."""
    torch.manual_seed(0)
    attn = timm.layers.Attention(16, num_heads=2).eval()
    x = torch.randn(1, 5, 16)
    q, k = attn.qkv(x).reshape(1, 5, 3, 2, 8).permute(2, 0, 3, 1, 4)[:2]
    expected = (q @ k.transpose(-2, -1) * attn.scale).softmax(-1)
    for runner in (lambda m, t: m(t), lambda m, t: m(x=t)):
        (got,) = analysis.capture_attention(attn, x, runner=runner)
        torch.testing.assert_close(got, expected)
    mask = torch.zeros(5, 5, dtype=torch.bool)
    for runner in (lambda m, t: m(t, attn_mask=mask), lambda m, t: m(t, mask), lambda m, t: m(t, is_causal=True)):
        with pytest.raises(ValueError, match="unmasked, non-causal"):
            analysis.capture_attention(attn, x, runner=runner)


def test_token_layouts_of_timm_models():
    """The prefix count is timm's num_prefix_tokens (CLS + register tokens), 0 for Swin; every ViT
    layer has the model's layout; a non-square Swin gives each block's own patch size per axis."""
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=0, reg_tokens=2)
    layout = token_layout(vit, (32, 32))
    assert layout == analysis.TokenLayout(3, (4, 4), (8, 8))
    assert analysis.attention_layouts(vit, (32, 32), 2) == [layout, layout]
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        token_layout(vit, (32, 28))
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        token_layout(vit, (28, 32))
    swin = timm.create_model("swin_tiny_patch4_window7_224", img_size=(32, 64), window_size=4, embed_dim=16,
                             depths=(1, 1), num_heads=(1, 2), num_classes=0)
    assert token_layout(swin, (32, 64)).num_prefix_tokens == 0
    layouts = analysis.attention_layouts(swin, (32, 64), 2)
    assert [(lay.num_prefix_tokens, lay.grid, lay.patch) for lay in layouts] == [(0, (4, 4), (4, 4)), (0, (4, 4), (8, 8))]
    windows = analysis.capture_attention(swin.eval().bfloat16(), torch.randn(1, 3, 32, 64).bfloat16())
    assert [(a.dtype, a.shape) for a in windows] == [(torch.float32, (8, 1, 16, 16)), (torch.float32, (2, 2, 16, 16))]
    torch.testing.assert_close(windows[1].sum(-1), torch.ones(2, 2, 16))


class StagedEncoder(nn.Module):
    """Mimics the isolocal encoder: stages of timm Blocks, a decoder unused by ``encode``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.patch_embed = timm.layers.PatchEmbed(img_size=32, patch_size=8, in_chans=3, embed_dim=48)
        self.cls_token = nn.Parameter(torch.randn(1, 1, 48))
        self.stages = nn.ModuleList(nn.Module() for _ in range(2))
        for stage in self.stages:
            stage.blocks = nn.Sequential(Block(48, 4, drop_path=0.5), Block(48, 4, attn_drop=0.5))
            stage.decoder = Block(48, 4)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        for stage in self.stages:
            x = stage.blocks(x)
        return x


def test_capture_staged_encoder_skips_unused_modules_and_restores_mode():
    model = StagedEncoder().train()
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    attn = analysis.capture_attention(model, images)
    assert len(attn) == 4 and all(a.shape == (3, 4, 17, 17) for a in attn)
    assert model.training
    again = analysis.capture_attention(model, images)  # eval mode inside: deterministic
    for a, b in zip(attn, again):
        torch.testing.assert_close(a, b)

    layout = token_layout(model, (32, 32))
    assert layout.num_prefix_tokens == 1 and layout.grid == (4, 4) and layout.patch == (8, 8)
    table = analysis.layer_table(attn, layout.grid, layout.patch, layout.num_prefix_tokens)
    assert list(table["layer"]) == [1, 2, 3, 4]
    assert table["nmi"].between(0, 1).all() and (table["attention_distance"] > 0).all()
    assert len(table["nmi_heads"][0]) == 4


def is_png(path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == PNG_SIGNATURE


def test_figures_from_real_photo(tmp_path):
    model = tiny_vit().eval()
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    photo = resize(astronaut(), (32, 32), anti_aliasing=True)  # float in [0, 1], (H, W, C)
    image = (torch.from_numpy(photo).float().permute(2, 0, 1) - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    attn = analysis.capture_attention(model, image[None])
    layout = token_layout(model, (32, 32))

    maps = analysis.plot_attention_maps(
        image, attn, layers=[1, 2], query_points=[(1, 1), (3, 2)], grid=layout.grid, patch=8,
        path=tmp_path / "maps", num_prefix_tokens=layout.num_prefix_tokens, mean=mean, std=std, pdf=True,
    )
    assert [p.suffix for p in maps] == [".png", ".pdf"]
    assert is_png(maps[0]) and imread(maps[0]).ndim == 3
    assert maps[1].read_bytes().startswith(b"%PDF")

    table = analysis.layer_table(attn, layout.grid, 8)
    curves = analysis.plot_metric_vs_depth({"global": table, "isolated": table.assign(nmi=table["nmi"] / 2)}, "nmi", tmp_path / "nmi.png")
    assert len(curves) == 1 and is_png(curves[0]) and imread(curves[0]).ndim == 3

    array_maps = analysis.plot_attention_maps(
        (photo * 255).astype(np.uint8), attn, layers=[2], query_points=[(0, 0)], grid=layout.grid, patch=8,
        path=tmp_path / "array_maps.png",
    )
    assert is_png(array_maps[0])


def test_attention_checks_name_the_map_and_scale_the_row_tolerance_with_the_dtype():
    """`check_attention`: a non-square map is refused like a 3-D one; rows may be off by 1e-3 in fp32 /
    fp64 and by 2e-2 in half precision (softmax rows round there), not more."""
    from analysis.metrics import check_attention

    with pytest.raises(ValueError, match=r"^attention must have shape \(images, heads, tokens, tokens\), got "
                                         r"\(2, 3, 10, 9\)"):
        check_attention(torch.full((2, 3, 10, 9), 1 / 9))
    with pytest.raises(ValueError, match="rows must sum to 1"):
        check_attention(torch.full((1, 1, 4, 4), 0.25125, dtype=torch.float32))  # off by 5e-3 in fp32
    check_attention(torch.full((1, 1, 4, 4), 0.25025, dtype=torch.float64))  # off by 1e-3: rounding
    check_attention(torch.full((1, 1, 4, 4), 0.2525, dtype=torch.float16))  # off by 1e-2 in fp16
    with pytest.raises(ValueError, match="rows must sum to 1"):
        check_attention(torch.full((1, 1, 4, 4), 0.2625, dtype=torch.bfloat16))  # off by 5e-2
