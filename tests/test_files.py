"""``cellseg.files``: axes from the file, channels, pixel size, planes, bad pixels, writers."""

import numpy as np
import pytest
import tifffile
from PIL import Image

from cellseg.datamodule import NucleiDataModule
from cellseg.datasets import prepare_image
from cellseg.files import ImageFileError, atomic, open_image, read_image, save_stack
from microscopy import nuclei_field, write_nan, write_ome, write_stack


def test_ome_tiff_channels_by_name_or_index_and_pixel_size(tmp_path):
    data = write_ome(tmp_path / "cells.ome.tif")
    image = open_image(tmp_path / "cells.ome.tif")
    assert image.axes == "CYX"
    assert image.channel_names == ["DAPI", "noise"]
    assert image.pixel_size == (0.5, 0.5)
    assert not image.stacked
    plane = image.plane()
    np.testing.assert_array_equal(plane, np.moveaxis(data, 0, -1))
    np.testing.assert_array_equal(image.select("dapi").nuclei(plane)[..., 0], data[0])
    np.testing.assert_array_equal(image.select(1).nuclei(plane)[..., 0], data[1])
    with pytest.raises(ImageFileError, match=r"cells.ome.tif has 2 channels \(0=DAPI, 1=noise\);"
                       r" choose the nuclei channel with channel="):
        image.select(None)
    with pytest.raises(ImageFileError, match="no channel named 'GFP'"):
        image.select("GFP")
    with pytest.raises(ImageFileError, match="channel=2 is not one of them"):
        image.select(2)


def test_z_stack_is_read_one_plane_at_a_time(tmp_path):
    data = write_stack(tmp_path / "stack.tif", planes=3)
    image = open_image(tmp_path / "stack.tif").select(None)
    assert image.planes_shape == {"Z": 3}
    assert image.stacked
    planes = list(image.planes())
    assert [index for index, _ in planes] == [{"Z": 0}, {"Z": 1}, {"Z": 2}]
    for z, (_, plane) in enumerate(planes):
        np.testing.assert_array_equal(plane[..., 0], data[z])
    with pytest.raises(ImageFileError, match=r"axes ZYX and shape \(3, 96, 96\): several planes"):
        read_image(tmp_path / "stack.tif")  # training data are 2-D


def test_imagej_hyperstack_planes_and_pixel_size(tmp_path):
    data = np.arange(2 * 3 * 2 * 16 * 12, dtype=np.uint16).reshape(2, 3, 2, 16, 12)
    path = tmp_path / "hyper.tif"
    tifffile.imwrite(path, data, imagej=True, metadata={"axes": "TZCYX", "unit": "um"},
                     resolution=(4.0, 2.0))  # pixels per µm in x and y
    image = open_image(path).select(0)
    assert image.axes == "TZCYX"
    assert image.planes_shape == {"T": 2, "Z": 3}
    assert image.pixel_size == (0.5, 0.25)
    np.testing.assert_array_equal(image.plane({"T": 1, "Z": 2}), np.moveaxis(data[1, 2], 0, -1))


def test_unnamed_axes_are_refused_with_the_option_that_names_them(tmp_path):
    data = np.random.default_rng(0).integers(0, 999, (24, 20, 5)).astype(np.uint16)
    path = tmp_path / "five.tif"
    tifffile.imwrite(path, data)  # (Y, X, 5) without axes: tifffile stores it as QYX
    with pytest.raises(ImageFileError, match=r"five.tif has axes QYX and shape \(24, 20, 5\).*"
                       "pass axes=.*e.g. axes=YXC"):
        open_image(path)
    image = open_image(path, axes="YXC").select(3)
    np.testing.assert_array_equal(image.nuclei(image.plane())[..., 0], data[..., 3])
    with pytest.raises(ImageFileError, match="axes=ZCYX names 4 axes, not 3"):
        open_image(path, axes="ZCYX")


def test_five_sample_tiff_needs_a_channel(tmp_path):
    data = np.random.default_rng(0).integers(0, 999, (24, 20, 5)).astype(np.uint16)
    path = tmp_path / "samples.tif"
    tifffile.imwrite(path, data, photometric="minisblack", planarconfig="contig")
    with pytest.raises(ImageFileError, match="has 5 channels"):
        read_image(path)
    np.testing.assert_array_equal(read_image(path, channel=2)[..., 0], data[..., 2])


def test_rgb_png_and_tiff_keep_their_colours_without_a_channel(tmp_path):
    from PIL import Image

    rgb = np.random.default_rng(0).integers(0, 255, (16, 12, 3)).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    tifffile.imwrite(tmp_path / "a.tif", rgb)
    for name in ("a.png", "a.tif"):
        np.testing.assert_array_equal(read_image(tmp_path / name), rgb)
    assert read_image(tmp_path / "a.png", channel=2).shape == (16, 12, 1)


def test_nan_and_inf_pixels_warn_and_take_the_lowest_finite_value(tmp_path, caplog):
    data = write_nan(tmp_path / "holes.tif")
    image = read_image(tmp_path / "holes.tif")
    assert "holes.tif: 259 NaN/inf pixels set to the image's lowest finite value" in caplog.text
    finite = np.isfinite(data)
    assert np.isfinite(image).all()
    assert image[0, 0, 0] == data[finite].min()
    np.testing.assert_array_equal(image[..., 0][finite], data[finite])
    x = prepare_image(image, 1)
    assert np.isfinite(x).all()
    assert x.max() == 1.0


def test_constant_and_all_nan_images_normalise_to_zeros(tmp_path, caplog):
    assert prepare_image(np.full((8, 8), 7, np.uint16), 1).max() == 0.0
    assert prepare_image(np.full((8, 8), np.nan, np.float32), 1).max() == 0.0
    assert "64 NaN/inf pixels" in caplog.text


def test_stack_writer_keeps_the_axes_and_atomic_leaves_nothing_on_failure(tmp_path):
    pages = [np.full((8, 6), k, np.uint16) for k in range(6)]
    save_stack(tmp_path / "labels.tif", iter(pages), (2, 3, 8, 6), "TZYX")
    with tifffile.TiffFile(tmp_path / "labels.tif") as tif:
        assert tif.series[0].axes == "TZYX"
        np.testing.assert_array_equal(tif.asarray()[1, 2], pages[5])
    with pytest.raises(RuntimeError), atomic(tmp_path / "x.csv") as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == [tmp_path / "labels.tif"]


def test_folder_of_ome_tiffs_trains_on_its_nuclei_channel(tmp_path, cfg_factory):
    from cellseg.train import train

    _, labels = nuclei_field()
    (tmp_path / "data/images").mkdir(parents=True)
    (tmp_path / "data/masks").mkdir()
    for k in range(4):
        data = write_ome(tmp_path / f"data/images/f{k}.ome.tif")
        tifffile.imwrite(tmp_path / f"data/masks/f{k}.tif", labels)
    dm = NucleiDataModule(str(tmp_path / "data"), layout="folder", in_channels=1, channel="DAPI",
                          test_size=0.25, img_size=96)
    dm.setup()
    image = dm.datasets["test"][0]["image"][0].numpy()
    np.testing.assert_allclose(image, prepare_image(data[0], 1)[..., 0], atol=1e-6)
    cfg = cfg_factory("data=folder", f"data.root={tmp_path / 'data'}", "data.channel=DAPI",
                      "model.net.in_channels=1", "data.batch_size=2", "trainer.max_epochs=1")
    assert "val/iou" in train(cfg)
    with pytest.raises(ImageFileError, match="has 2 channels"):
        NucleiDataModule(str(tmp_path / "data"), layout="folder", test_size=0.25).setup()


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_truncated_stack_names_the_file(tmp_path, compression):
    path = tmp_path / "cut.tif"
    data = np.random.default_rng(0).integers(0, 999, (4, 32, 32)).astype(np.uint16)
    tifffile.imwrite(path, data, metadata={"axes": "ZYX"}, compression=compression)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ImageFileError, match="cannot read image .*cut.tif.*replace or remove"):
        for _ in open_image(path).planes():
            pass


def test_alpha_is_neither_input_nor_measured(tmp_path):
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "stained.png")
    image = open_image(tmp_path / "stained.png").select(None)
    assert image.channel_names == ["R", "G", "B"]
    assert image.rgb
    plane = image.plane()
    assert plane.shape == (20, 20, 3)
    assert plane[..., 0].max() == 200
