"""Whole-image prediction: padding, tiling, test-time augmentation, resize-mode scaling."""

import numpy as np
import pytest
import torch
from torch import nn

from cellseg.inference import (
    dihedral,
    predict_image,
    predict_tensor,
    tile_layout,
    undo_dihedral,
)
from cellseg.unet import UNet


class Recorder(nn.Module):
    """A per-pixel model (1x1 convolution) that records the input shapes it sees."""

    multiple = 16

    def __init__(self, in_channels=3, out_channels=2):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(in_channels, out_channels, 1)
        self.shapes = []

    def forward(self, x):
        self.shapes.append(tuple(x.shape))
        return self.conv(x)


@pytest.mark.parametrize("k", range(8))
def test_dihedral_is_undone(k):
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    assert torch.equal(undo_dihedral(dihedral(x, k), k), x)
    assert len({dihedral(x, j).flatten().tolist().__repr__() for j in range(8)}) == 8


def test_tiled_prediction_equals_whole_image_for_a_local_model():
    model = Recorder()
    image = torch.rand(3, 200, 150)
    whole = predict_tensor(model, image, tile_size=256)
    tiled = predict_tensor(model, image, tile_size=64, overlap=16, batch_size=3)
    assert whole.shape == tiled.shape == (2, 200, 150)
    torch.testing.assert_close(tiled, whole, atol=1e-5, rtol=1e-5)
    assert max(s[-1] for s in model.shapes[1:]) == 64  # tiles, never the whole image
    assert max(s[0] for s in model.shapes[1:]) <= 3  # batch of tiles


def test_tta_of_an_equivariant_model_changes_nothing():
    model = Recorder()
    image = torch.rand(3, 48, 32)
    torch.testing.assert_close(
        predict_tensor(model, image, tta=True), predict_tensor(model, image), atol=1e-6, rtol=0
    )


def test_unet_predicts_odd_sizes_and_tiles_without_seams():
    torch.manual_seed(0)
    model = UNet(3).eval()
    image = torch.rand(3, 150, 170)
    whole = predict_tensor(model, image, tile_size=256)
    tiled = predict_tensor(model, image, tile_size=96, overlap=32)
    assert whole.shape == (1, 150, 170)
    assert (tiled - whole).abs().mean() < 0.02


def test_resize_mode_predicts_at_training_scale_and_returns_native_size():
    model = Recorder(3, 1)
    image = np.random.default_rng(0).random((100, 130, 3)).astype(np.float32)
    probs = predict_image(model, image, mode="resize", img_size=64)
    assert probs.shape == (100, 130, 1)
    assert model.shapes == [(1, 3, 64, 64)]
    assert 0 <= probs.min() and probs.max() <= 1


def test_tile_size_must_be_a_multiple_of_16():
    with pytest.raises(ValueError, match="multiple of 16"):
        predict_tensor(Recorder(), torch.rand(3, 32, 32), tile_size=100)


@pytest.mark.parametrize("length", [208, 500, 1024, 1040, 2048, 3000, 4096])
@pytest.mark.parametrize(("tile", "overlap"), [(256, 32), (512, 32), (1024, 32), (1024, 128)])
def test_tile_layout_covers_with_the_overlap_and_little_more(length, tile, overlap):
    size, starts = tile_layout(length, tile, overlap, 16)
    assert starts[0] == 0 and starts[-1] + size == length  # the whole side, nothing beyond
    if len(starts) > 1:
        assert size % 16 == 0 and size <= tile
        assert min(a + size - b for a, b in zip(starts[:-1], starts[1:], strict=True)) >= overlap
        fewer = len(starts) - 1  # one tile fewer of the full size could not cover the side
        assert fewer * tile - (fewer - 1) * overlap < length


def test_a_2048_side_takes_three_tiles_of_704():
    assert tile_layout(2048, 1024, 32, 16) == (704, [0, 672, 1344])
