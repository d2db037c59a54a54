"""Fixed sin-cos positions against MAE's formula, and a published decoder loaded onto isolocal's layout."""
import math

import pytest
import torch

from isolocal.models.decoder import LocalDecoder, load_published_decoder
from isolocal.models.posembed import mae_channel_order, sincos_pos_embed


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
