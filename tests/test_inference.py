"""Whole-image prediction: padding, tiling, test-time augmentation, resize-mode scaling."""

import numpy as np
import pytest
import torch
from torch import nn

from cellseg.inference import (
    dihedral,
    predict_image,
    predict_tensor,
    resize_shape,
    tile_layout,
    turn_offsets,
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


@pytest.mark.parametrize("k", range(8))
def test_centre_offsets_predicted_on_a_flipped_or_turned_image_are_turned_back(k):
    """What a perfect network predicts on dihedral(image, k), put back in place and turned
    back, is what it predicts on the image: so test-time augmentation may average it."""
    from cellseg.targets import targets_from_labels

    labels = np.zeros((24, 28), np.int64)
    labels[2:9, 3:15], labels[10:22, 5:11], labels[12:20, 13:22] = 1, 2, 3

    def targets(lab):
        return torch.from_numpy(targets_from_labels(lab, 5)).permute(2, 0, 1)[None]

    turned = dihedral(torch.from_numpy(labels)[None, None], k)[0, 0].numpy()
    back = turn_offsets(undo_dihedral(targets(turned), k), k)
    torch.testing.assert_close(back, targets(labels), atol=1e-6, rtol=0)
    if k:  # without turning the offsets back, they would point the wrong way
        assert (undo_dihedral(targets(turned), k) - targets(labels)).abs().max() > 0.5


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
    assert 0 <= probs.min()
    assert probs.max() <= 1


def test_tile_size_must_be_a_multiple_of_16():
    with pytest.raises(ValueError, match="multiple of 16"):
        predict_tensor(Recorder(), torch.rand(3, 32, 32), tile_size=100)


@pytest.mark.parametrize("length", [208, 500, 1024, 1040, 2048, 3000, 4096])
@pytest.mark.parametrize(("tile", "overlap"), [(256, 32), (512, 32), (1024, 32), (1024, 128)])
def test_tile_layout_covers_with_the_overlap_and_little_more(length, tile, overlap):
    size, starts = tile_layout(length, tile, overlap, 16)
    assert starts[0] == 0
    assert starts[-1] + size == length
    if len(starts) > 1:
        assert size % 16 == 0
        assert size <= tile
        assert min(a + size - b for a, b in zip(starts[:-1], starts[1:], strict=True)) >= overlap
        fewer = len(starts) - 1  # one tile fewer of the full size could not cover the side
        assert fewer * tile - (fewer - 1) * overlap < length


def test_a_2048_side_takes_three_tiles_of_704():
    assert tile_layout(2048, 1024, 32, 16) == (704, [0, 672, 1344])


class OnDevice(torch.Tensor):
    """A tensor that behaves as one in accelerator memory: ``numpy()`` fails until ``cpu()``."""

    def numpy(self, *args, **kwargs):
        raise TypeError("can't convert a device tensor to numpy; use .cpu() first")

    def cpu(self, *args, **kwargs):
        return self.as_subclass(torch.Tensor)


class DeviceModel(Recorder):
    """A per-pixel model whose outputs live 'on the device'."""

    def forward(self, x):
        return super().forward(x).as_subclass(OnDevice)


@pytest.mark.parametrize(("mode", "tile_size"), [("resize", 1024), ("crop", 1024), ("crop", 64)])
def test_every_prediction_path_returns_cpu_memory(mode, tile_size):
    image = np.random.default_rng(0).random((100, 130, 3)).astype(np.float32)
    probs = predict_image(DeviceModel(3, 1), image, mode=mode, tile_size=tile_size, overlap=16)
    assert type(probs) is np.ndarray
    assert probs.shape == (100, 130, 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_a_model_on_cuda_gives_numpy_back():
    model = UNet(3).eval().cuda()
    image = np.random.default_rng(0).random((100, 130, 3)).astype(np.float32)
    for mode, tile in (("resize", 1024), ("crop", 1024), ("crop", 64)):
        probs = predict_image(model, image, mode=mode, tile_size=tile, overlap=16)
        assert type(probs) is np.ndarray
        assert probs.shape == (100, 130, 1)


def test_the_network_multiple_sets_padding_and_tiles():
    model = UNet(3, channels=(4, 8, 16, 32, 64), bottleneck=64).eval()  # 5 levels: 32
    assert model.multiple == 32
    image = torch.rand(3, 70, 90)
    assert predict_tensor(model, image).shape == (1, 70, 90)  # padded to 96 x 96 inside
    assert predict_tensor(model, image, tile_size=64, overlap=16).shape == (1, 70, 90)
    with pytest.raises(ValueError, match="tile_size=48 must be a multiple of 32"):
        predict_tensor(model, image, tile_size=48)
    with pytest.raises(ValueError, match="pass multiple="):
        predict_tensor(nn.Conv2d(3, 1, 1), image)


@pytest.mark.parametrize(
    ("h", "w", "expected"),
    [(256, 256, (64, 64)), (520, 696, (64, 64)), (300, 5000, (64, 1067)), (5000, 300, (1067, 64))],
)
def test_resize_mode_squashes_like_training_only_near_square_images(h, w, expected):
    assert resize_shape(h, w, 64, max_squash=2.0) == expected


def test_a_long_strip_keeps_its_aspect_ratio_in_resize_mode():
    model = Recorder(3, 1)
    image = np.random.default_rng(0).random((40, 400, 3)).astype(np.float32)
    probs = predict_image(model, image, mode="resize", img_size=64, max_squash=2.0)
    assert probs.shape == (40, 400, 1)
    assert model.shapes == [(1, 3, 64, 640)]  # 10:1 kept, short side at the training size


def test_diameter_scale_checks_the_value_and_the_model():
    from cellseg.inference import diameter_scale

    crop = {"mode": "crop", "img_size": 64, "diameter": 20.0}
    assert diameter_scale(crop, None) is None
    assert diameter_scale(crop, 40) == pytest.approx(0.5)
    for bad, says in (("abc", "diameter='abc': give"), (-3, "above 0"), (0, "above 0")):
        with pytest.raises(ValueError, match=says):
            diameter_scale(crop, bad)
    with pytest.raises(ValueError, match="resizes every image to 64x64"):
        diameter_scale({**crop, "mode": "resize"}, 30)
    with pytest.raises(ValueError, match="records no nucleus diameter"):
        diameter_scale({**crop, "diameter": None}, 30)


@pytest.mark.parametrize(("scale", "method"), [(2.0, "cubic"), (0.5, "area")])
def test_rescaled_images_are_enlarged_cubic_and_shrunk_by_area(monkeypatch, scale, method):
    """diameter= enlarges images of small nuclei with cubic interpolation (sharper than linear:
    on the validation images at 0.5x of the model shipped on 2026-12-03, map 0.529 against
    0.516; docs/model.md) and shrinks by
    area averaging; the results come back to the image's grid (probabilities averaged by area
    from an enlarged image, else linear; labels nearest)."""
    from cellseg import inference

    methods = []
    real = inference.resize
    monkeypatch.setattr(inference, "resize",
                        lambda a, size, how="area": methods.append(how) or real(a, size, how))
    monkeypatch.setattr(inference, "segment", lambda net, image, *a: (
        np.zeros(image.shape[:2], np.float32), np.ones(image.shape[:2], np.int32)))
    image = np.random.default_rng(0).random((32, 48, 1)).astype(np.float32)
    foreground, labels = inference.segment_rescaled(None, image, {}, {}, {}, scale)
    back = "area" if scale > 1 else "linear"  # an enlarged image's probabilities averaged back
    assert methods == [method, back, "nearest"]
    assert foreground.shape == labels.shape == (32, 48)


@pytest.mark.parametrize("scale", [1.62, 0.7])
def test_labels_mapped_back_stay_where_their_nuclei_are(scale):
    """Labels go to a rescaled grid and come back centre on centre, as the image does (cv2's
    INTER_NEAREST maps pixel corners, not centres: at these factors, as diameter=auto chooses
    them, nuclei came back 1-1.3 px down and right, which cost the enlarged test images up to
    0.056 of their matched nuclei's IoU;
    docs/model-experiments.md#labels-mapped-back-centre-on-centre)."""
    from cellseg.datasets import resize

    yy, xx = np.mgrid[:90, :120]
    labels = ((yy - 40.3) ** 2 + (xx - 61.7) ** 2 <= 15**2).astype(np.int32)
    big = resize(labels, (round(90 * scale), round(120 * scale)), "nearest")
    back = resize(big, (90, 120), "nearest")
    for mapped, factor in ((big, scale), (back, 1.0)):
        rows, cols = np.nonzero(mapped)
        # a pixel's centre is at index + 0.5 on both grids
        assert (rows.mean() + 0.5) / factor - 0.5 == pytest.approx(40.3, abs=0.2)
        assert (cols.mean() + 0.5) / factor - 0.5 == pytest.approx(61.7, abs=0.2)


def test_an_enlarged_segmentation_comes_back_outlined_by_its_averaged_probabilities(monkeypatch):
    """Back from an image enlarged 2x, a nucleus covers the pixels whose probability, averaged
    over the pixel, passes the threshold, not those whose one nearest sample lies inside it
    (docs/model-experiments.md#labels-mapped-back-centre-on-centre); a mask pixel next to a
    nucleus joins it, a nucleus with no such pixel is gone and the rest are numbered 1..N."""
    from cellseg import inference

    def segmenting(columns, labelled):
        def segment(net, image, *a):  # every row alike, 6 columns: 3 pixels of the image
            foreground = np.tile(np.array(columns, np.float32), (image.shape[0], 1))
            labels = np.zeros(image.shape[:2], np.int32)
            labels[:, labelled] = 2  # numbered 2: as if a first nucleus had been dropped
            labels[1, 5] = 3  # a speck with no probability behind it (sampled: row 1)
            return foreground, labels
        return segment

    image = np.zeros((3, 3, 1), np.float32)
    # pixel 1 averages 0.475: out, though its nearest sample (column 3) is labelled
    monkeypatch.setattr(inference, "segment", segmenting([1, 1, 0.45, 0.5, 0, 0], slice(0, 4)))
    foreground, labels = inference.segment_rescaled(None, image, {}, {}, {"threshold": 0.5}, 2.0)
    assert foreground[0].tolist() == pytest.approx([1.0, 0.475, 0.0])
    assert labels.tolist() == [[1, 0, 0]] * 3
    # pixel 1 averages 1.0: in, though its nearest sample (column 3) is not labelled
    monkeypatch.setattr(inference, "segment", segmenting([1, 1, 1, 1, 0, 0], slice(0, 3)))
    _, labels = inference.segment_rescaled(None, image, {}, {}, {"threshold": None}, 2.0)
    assert labels.tolist() == [[1, 1, 0]] * 3


def test_a_shrunk_segmentation_comes_back_outlined_by_its_interpolated_probabilities(
    monkeypatch,
):
    """Back from an image shrunk 8x, a nucleus is not a staircase of 8x8 blocks: its pixels are
    those where the interpolated probability passes the threshold (the outline lies up to half a
    block beyond the blocks: more than the 2 px an enlarged image's labels are grown by)."""
    from cellseg import inference

    def segment(net, image, *a):
        yy, xx = np.mgrid[: image.shape[0], : image.shape[1]]
        foreground = np.clip(1.2 - np.hypot(yy - 4.3, xx - 5.6) / 3, 0, 1).astype(np.float32)
        return foreground, (foreground > 0.5).astype(np.int32)

    monkeypatch.setattr(inference, "segment", segment)
    image = np.zeros((80, 96, 1), np.float32)
    foreground, labels = inference.segment_rescaled(None, image, {}, {}, {"threshold": 0.5},
                                                    1 / 8)
    np.testing.assert_array_equal(labels > 0, foreground > 0.5)
    assert labels.max() == 1
    blocky = np.kron(segment(None, np.zeros((10, 12)))[1], np.ones((8, 8), np.int32))
    assert (blocky != labels).sum() > 10  # the staircase's corners are gone
