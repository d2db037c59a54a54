"""Analysis end to end: checkpoint formats, image sources, the `isolocal analyze` command, tracking."""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from matplotlib.image import imread
from PIL import Image
from skimage.data import astronaut, coffee
from timm.models.vision_transformer import VisionTransformer

import isolocal
import analysis
from analysis import capture_attention, layer_table
from analysis.capture import TokenLayout, token_layout
from analysis.loading import input_shape, load_images
from analysis.tracking import AttentionTracker
from isolocal.cli import main
from isolocal.config import RunConfig, to_dict
from isolocal.io.load import load_model
from isolocal.data import FASHION_MNIST_MEAN, FASHION_MNIST_ROOT, IMAGENET_MEAN, build_dataset

pytestmark = pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_ROOT), reason="apt-get install dataset-fashion-mnist")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NANO_LAYOUT = TokenLayout(num_prefix_tokens=1, grid=(8, 8), patch=(4, 4))


def save_isolocal(model: isolocal.StagewiseEncoder, path) -> None:
    """The isolocal checkpoint format: StagewiseEncoder state dict + the run config holding its ModelConfig."""
    torch.save({"model": model.state_dict(), "config": to_dict(RunConfig(model=model.cfg)), "step": 4}, path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """localmim_vit_nano after a few AdamW steps on real Fashion-MNIST, saved as an isolocal checkpoint."""
    torch.manual_seed(0)
    model = isolocal.create_model("localmim_vit_nano")
    root = tmp_path_factory.mktemp("ckpt")
    save_isolocal(model, root / "init.pt")
    data, _, _ = build_dataset("fashion_mnist", None, train=True, img_size=32, in_chans=1, transform_train=False)
    images = torch.stack([data[i][0] for i in range(64)])
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for step in range(6):
        batch = images[32 * (step % 2): 32 * (step % 2 + 1)]
        loss = model(batch, model.random_mask(len(batch), g)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    save_isolocal(model, root / "trained.pt")
    return model, root / "trained.pt", root / "init.pt"


def load_encoder(path, arch_hint=None):
    """(encoder, its token layout at its own image size), any format, as `isolocal analyze` loads it."""
    model = load_model(path, arch_hint=arch_hint, encoder_only=True)
    size, _ = input_shape(model)
    return model, token_layout(model, (size, size))


def is_png(path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == PNG_SIGNATURE and imread(path).ndim == 3


def write_formats(model: isolocal.StagewiseEncoder, root) -> dict:
    """The same encoder as an isolocal checkpoint, a timm state dict, an MAE and a LocalMIM checkpoint."""
    _, timm_sd = isolocal.export_timm(model)
    args = argparse.Namespace(model="MIM_vit_nano", mask_ratio=0.75)
    mae = {**timm_sd, "mask_token": torch.zeros(1, 1, 32), "decoder_embed.weight": torch.randn(32, 64),
           "decoder_pos_embed": torch.zeros(1, 65, 32), "decoder_blocks.0.attn.qkv.weight": torch.randn(96, 32)}
    localmim = {k: v for k, v in timm_sd.items() if not k.startswith("norm.")}
    for k, stage in enumerate(model.stages):
        localmim[f"norm.{k}.weight"], localmim[f"norm.{k}.bias"] = stage.norm.weight, stage.norm.bias
    localmim.update({"decoder.0.embed.weight": torch.randn(64, 64), "hog_enc.0.conv.weight": torch.randn(2, 1, 3, 3)})
    paths = {name: root / f"{name}.pth" for name in ("isolocal", "timm", "mae", "localmim")}
    save_isolocal(model, paths["isolocal"])
    torch.save(timm_sd, paths["timm"])
    torch.save({"model": mae, "args": args, "epoch": 3}, paths["mae"])
    torch.save({"model": localmim, "args": args, "epoch": 3}, paths["localmim"])
    return paths


def test_four_formats_give_the_same_attention(trained, tmp_path):
    model = trained[0]
    images = load_images("fmnist:0,5", 32, 1).images
    reference = capture_attention(model, images)
    for name, path in write_formats(model, tmp_path).items():
        loaded, layout = load_encoder(path, {"num_heads": 2})
        assert isinstance(loaded, isolocal.StagewiseEncoder if name == "isolocal" else VisionTransformer), name
        assert layout == NANO_LAYOUT and not loaded.training
        got = capture_attention(loaded, images)
        assert len(got) == len(reference) == 4
        for a, r in zip(got, reference):
            torch.testing.assert_close(a, r, atol=1e-5, rtol=0, msg=name)
        if name == "localmim":  # the last tap's norm, not the first, becomes timm's final norm
            assert torch.equal(loaded.norm.weight, model.stages[-1].norm.weight)
            assert not torch.equal(loaded.norm.weight, model.stages[0].norm.weight)


def test_heads_inferred_for_standard_width_else_required(tmp_path):
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8, depth=2).eval()
    torch.save({"state_dict": {f"module.{k}": v for k, v in vit.state_dict().items()}}, tmp_path / "ddp.pth")
    loaded, layout = load_encoder(tmp_path / "ddp.pth")
    assert loaded.blocks[0].attn.num_heads == 3 and layout.grid == (4, 4)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for a, b in zip(capture_attention(loaded, images), capture_attention(vit, images)):
        torch.testing.assert_close(a, b)

    odd = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8,
                            embed_dim=48, depth=1, num_heads=4)
    torch.save(odd.state_dict(), tmp_path / "odd.pth")
    with pytest.raises(ValueError, match="cannot infer num_heads for embed_dim 48.*--heads"):
        load_encoder(tmp_path / "odd.pth")
    assert load_encoder(tmp_path / "odd.pth", {"num_heads": 4})[0].blocks[0].attn.num_heads == 4
    with pytest.raises(ValueError, match="num_heads 5 must be a positive divisor of embed_dim 48"):
        load_encoder(tmp_path / "odd.pth", {"num_heads": 5})


def test_bad_files_name_what_is_missing(trained, tmp_path):
    torch.save({"model": {"encoder.weight": torch.zeros(3)}}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError) as err:
        load_encoder(tmp_path / "wrong.pth")
    for key in ("patch_embed.proj.weight", "pos_embed", "blocks.0.attn.qkv.weight", "encoder.weight"):
        assert key in str(err.value)

    torch.save({"model": trained[0].state_dict()}, tmp_path / "no_config.pth")
    with pytest.raises(ValueError, match=r"missing keys \['config'\]"):
        load_encoder(tmp_path / "no_config.pth")

    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth .*is unreadable"):
        load_encoder(tmp_path / "garbage.pth")
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        load_encoder(tmp_path / "absent.pth")


def test_image_sources(tmp_path):
    gray = load_images("fmnist:0,5,17", 32, 1)
    assert gray.images.shape == (3, 1, 32, 32) and gray.names == ["fmnist_0", "fmnist_5", "fmnist_17"]
    assert gray.mean == FASHION_MNIST_MEAN
    # Normalized with the stats it reports: undoing them gives pixels in [0, 1] with black background.
    pixels = gray.images * gray.std[0] + gray.mean[0]
    assert pixels.min() > -1e-3 and pixels.max() < 1 + 1e-3 and pixels[:, :, 0, 0].abs().max() < 0.05

    photos = load_images("skimage:astronaut,camera", 32, 3)
    assert photos.images.shape == (2, 3, 32, 32) and photos.mean == IMAGENET_MEAN
    # the gray camera photo is replicated to 3 channels, then normalized per channel
    torch.testing.assert_close(photos.images[1, 0] * 0.229 + 0.485, photos.images[1, 1] * 0.224 + 0.456)

    Image.fromarray(coffee()).save(tmp_path / "b_coffee.png")
    Image.fromarray(astronaut()).save(tmp_path / "a_astronaut.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    folder = load_images(str(tmp_path), 32, 1)
    assert folder.images.shape == (2, 1, 32, 32) and folder.names == ["a_astronaut", "b_coffee"]

    for spec, message in [("fmnist:3,x", r"\['x'\] are not Fashion-MNIST"), ("fmnist:10000", r"\[10000\] out of range"),
                          ("skimage:astronaut,lena", r"unknown scikit-image photos \['lena'\]; valid: astronaut"),
                          (str(tmp_path / "nowhere"), "not a known image source; use fmnist:")]:
        with pytest.raises(ValueError, match=message):
            load_images(spec, 32, 1)


def direct_table(model, spec: str):
    return layer_table(capture_attention(model, load_images(spec, 32, 1).images), (8, 8), (4, 4))


def test_cli_figures_and_csv_from_trained_model(trained, tmp_path, capsys):
    model, ckpt, init = trained
    out = tmp_path / "out"
    assert main(["analyze", "attention", "--ckpt", str(ckpt), "--images", "fmnist:0,5", "--out", str(out), "--pdf"]) == 0
    for name in ("fmnist_0", "fmnist_5"):
        assert is_png(out / f"attention_trained_{name}.png")
        assert (out / f"attention_trained_{name}.pdf").read_bytes().startswith(b"%PDF")
    maps = pd.read_csv(out / "attention_trained.csv")
    assert list(maps["layer"]) == [1, 2, 3, 4]  # nano's tap layers
    assert {"fmnist_0 (4,4)", "fmnist_5 (2,2)"} <= set(maps.columns)  # default queries: centre, quarter
    row = np.array(json.loads(maps["fmnist_0 (4,4)"][0]))
    assert row.shape == (64,) and abs(row.sum() - 1) < 1e-9

    args = ["analyze", "nmi", "--ckpt", str(ckpt), "--ckpt", str(init), "--label", "trained", "--label", "init",
            "--images", "fmnist:0,5,17", "--out", str(out)]
    assert main(args) == 0
    assert is_png(out / "nmi.png") and not (out / "nmi.pdf").exists()
    nmi = pd.read_csv(out / "nmi.csv")
    assert len(nmi) == 4 and list(nmi.columns) == ["layer", "trained", "trained_heads", "init", "init_heads"]
    np.testing.assert_allclose(nmi["trained"], direct_table(model, "fmnist:0,5,17")["nmi"], rtol=1e-9)
    assert not np.allclose(nmi["trained"], nmi["init"])

    assert main(["analyze", "distance", "--ckpt", str(ckpt), "--images", "skimage:astronaut", "--out", str(out),
                 "--layers", "2,4"]) == 0
    dist = pd.read_csv(out / "distance.csv")
    assert list(dist["layer"]) == [2, 4] and is_png(out / "distance.png")
    expected = direct_table(model, "skimage:astronaut")["attention_distance"].to_numpy()[[1, 3]]
    np.testing.assert_allclose(dist["trained"], expected, rtol=1e-9)
    assert str(out / "distance.csv") in capsys.readouterr().out


def test_analyze_the_study_job_and_the_tracker_report_the_same_attention(trained, tmp_path):
    """The three callers of `analysis.measure_attention` give its numbers, to the last bit."""
    from isolocal.study.job import ANALYSIS, analyse

    ckpt, spec = trained[1], "fmnist:0,5,17"
    model = isolocal.load_checkpoint(ckpt)
    images = load_images(spec, 32, 1).images
    expected = analysis.measure_attention(model, images)
    for what, column in (("nmi", "nmi"), ("distance", "attention_distance")):
        assert main(["analyze", what, "--ckpt", str(ckpt), "--images", spec, "--out", str(tmp_path / "cli")]) == 0
        table = pd.read_csv(tmp_path / "cli" / f"{what}.csv")
        assert table["trained"].tolist() == expected[column].tolist()
        assert [json.loads(h) for h in table["trained_heads"]] == expected[f"{column}_heads"].tolist()
    logged = AttentionTracker(images, 1).measure(model)
    assert logged == {"nmi_layer": expected["nmi"].tolist(), "attn_dist_layer": expected["attention_distance"].tolist()}
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    analyse({"images": spec, "attention_image": 0, "query": [[4, 4]]}, model, run_dir)
    pd.testing.assert_frame_equal(pd.read_csv(run_dir / ANALYSIS), expected[["layer", "nmi", "attention_distance"]])


def test_cli_rejects_bad_arguments_before_work(trained, tmp_path, capsys):
    ckpt = str(trained[1])
    cases = [
        (["--layers", "2,9"], r"--layers [9] out of range"),
        (["--query", "8,0"], "outside the (8, 8) token grid"),
        (["--label", "a", "--label", "b"], "2 --label for 1 --ckpt"),
    ]
    for extra, message in cases:
        out = tmp_path / "never"
        assert main(["analyze", "attention", "--ckpt", ckpt, "--images", "fmnist:0", "--out", str(out), *extra]) == 2
        assert message in capsys.readouterr().err and not out.exists()


def test_tracker_logs_one_value_per_layer_every_n_steps(trained):
    model = isolocal.create_model("localmim_vit_nano").train()
    model.load_state_dict(trained[0].state_dict())
    probe = load_images("fmnist:0,1,2,3", 32, 1).images
    tracker = AttentionTracker(probe, every_n_steps=3)
    assert tracker.maybe_log(1, model) is None and tracker.maybe_log(4, model) is None
    rng = torch.get_rng_state()
    logged = tracker.maybe_log(6, model)
    assert torch.equal(rng, torch.get_rng_state()) and model.training
    assert set(logged) == {"nmi_layer", "attn_dist_layer"}
    assert len(logged["nmi_layer"]) == len(logged["attn_dist_layer"]) == 4
    expected = direct_table(trained[0], "fmnist:0,1,2,3")
    np.testing.assert_allclose(logged["nmi_layer"], expected["nmi"], rtol=1e-9)
    np.testing.assert_allclose(logged["attn_dist_layer"], expected["attention_distance"], rtol=1e-9)
    assert AttentionTracker(probe, 0).maybe_log(0, model) is None
    with pytest.raises(ValueError, match="every_n_steps must be >= 0"):
        AttentionTracker(probe, -1)


def test_swin_window_attention_capture_layouts_and_cli(tmp_path, capsys):
    from timm.models.swin_transformer import WindowAttention

    torch.manual_seed(0)
    model = isolocal.create_model("localmim_swin_nano").eval()
    images = load_images("fmnist:0,5", 32, 1).images
    windows = [m for m in model.modules() if isinstance(m, WindowAttention)]
    reference = []  # timm's own unfused softmax output: a test reference only
    for m in windows:
        m.fused_attn = False
        m.softmax.register_forward_hook(lambda mod, args, out: reference.append(out.clone()))
    with torch.no_grad():
        model.encode(images)
    for m in windows:
        m.fused_attn = True
    attn = capture_attention(model, images)
    assert len(attn) == len(reference) == 8
    for a, r in zip(attn, reference):
        torch.testing.assert_close(a, r, atol=1e-5, rtol=0)
    assert attn[0].shape == (2 * 64, 1, 16, 16) and attn[7].shape == (2, 8, 16, 16)

    layouts = analysis.attention_layouts(model, (32, 32), len(attn))
    assert [lay.patch for lay in layouts] == [(p, p) for p in (1, 1, 2, 2, 4, 4, 8, 8)]
    assert all(lay.grid == (4, 4) and lay.num_prefix_tokens == 0 for lay in layouts)

    # Distance of the shifted block 2 (grid 32, shift 2) from true token coordinates: the rolled window
    # grid gives the same number because the region mask leaves ~0 weight across the border.
    a = analysis.metrics.patch_attention(attn[1], 0).view(2, 8, 8, 1, 16, 16)
    rows, cols = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    true = torch.stack([(rows + 2) % 32, (cols + 2) % 32], -1).double() + 0.5  # rolled -> true position
    true = true.view(8, 4, 8, 4, 2).permute(0, 2, 1, 3, 4).reshape(8, 8, 16, 2)  # per window, row-major
    dist = torch.cdist(true, true)  # (8, 8, 16, 16)
    direct = (a * dist[None, :, :, None]).sum(-1).mean().item()
    table = analysis.layout_table(attn, layouts)
    assert abs(table["attention_distance"][1] - direct) < 1e-5 * direct
    assert table["nmi"].between(0, 1).all()

    logged = AttentionTracker(images, 1).maybe_log(5, model)
    np.testing.assert_allclose(logged["nmi_layer"], table["nmi"], rtol=1e-9)

    save_isolocal(model, tmp_path / "swin.pt")
    base = ["analyze", "--ckpt", str(tmp_path / "swin.pt"), "--images", "fmnist:0,5", "--out", str(tmp_path / "out")]
    assert main([base[0], "nmi", *base[1:]]) == 0
    assert len(pd.read_csv(tmp_path / "out" / "nmi.csv")) == 8 and is_png(tmp_path / "out" / "nmi.png")
    assert main([base[0], "attention", *base[1:]]) == 2
    assert "Swin encoder" in capsys.readouterr().err
