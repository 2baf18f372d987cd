"""Readers on tiny generated folders of each layout, channel conversion and normalisation."""

import numpy as np
import pytest
import tifffile
from PIL import Image

from cellseg.datasets import (
    labels_from_mask,
    normalize,
    read_image,
    read_samples,
    to_channels,
)
from cellseg.synthetic import write_sample


def two_nuclei(h=32, w=40):
    labels = np.zeros((h, w), np.int32)
    labels[2:8, 2:8] = 1
    labels[10:20, 8:16] = 2
    image = np.stack([labels * 100] * 3, -1).astype(np.uint8)
    return image, labels


def test_dsb2018_reader_merges_one_png_per_nucleus(tmp_path):
    image, labels = two_nuclei()
    write_sample(tmp_path, "b", image, labels)
    write_sample(tmp_path, "a", image, labels[:, ::-1].copy())
    samples = read_samples(tmp_path, "dsb2018")
    assert [s.id for s in samples] == ["a", "b"]  # sorted ids
    assert samples[1].labels.max() == 2
    np.testing.assert_array_equal(samples[1].labels > 0, labels > 0)
    assert samples[1].image.shape == (32, 40, 3)


def test_dsb2018_empty_masks_folder_is_an_image_without_nuclei(tmp_path):
    image, _ = two_nuclei()
    write_sample(tmp_path, "a", image, np.zeros((32, 40), np.int32))
    (sample,) = read_samples(tmp_path, "dsb2018")
    assert sample.labels.max() == 0


def test_dsb2018_sample_without_masks_folder_is_skipped_with_warning(tmp_path):
    image, labels = two_nuclei()
    write_sample(tmp_path, "a", image, labels)
    write_sample(tmp_path, "b", image, labels)
    for f in (tmp_path / "b/masks").iterdir():
        f.unlink()
    (tmp_path / "b/masks").rmdir()
    with pytest.warns(UserWarning, match="no masks/ folder"):
        samples = read_samples(tmp_path, "dsb2018")
    assert [s.id for s in samples] == ["a"]


def test_mask_of_other_size_names_the_file(tmp_path):
    image, labels = two_nuclei()
    write_sample(tmp_path, "a", image, labels)
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "a/masks/bad.png")
    with pytest.raises(ValueError, match="bad.png"):
        read_samples(tmp_path, "dsb2018")


def test_folder_reader_binary_png_and_labelled_tiff(tmp_path):
    image, labels = two_nuclei()
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.fromarray(image).save(tmp_path / "images/x.png")
    Image.fromarray(((labels > 0) * 255).astype(np.uint8)).save(tmp_path / "masks/x.png")
    tifffile.imwrite(tmp_path / "images/y.tif", (image[..., 0].astype(np.uint16) * 200))
    tifffile.imwrite(tmp_path / "masks/y.tif", labels.astype(np.uint16))
    (tmp_path / "images/notes.txt").write_text("not an image")
    x, y = read_samples(tmp_path, "folder")
    assert x.labels.max() == 2  # binary mask -> connected components
    np.testing.assert_array_equal(y.labels, labels)  # instance labels kept
    assert y.image.dtype == np.uint16


def test_folder_reader_names_images_without_masks(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "images/lonely.png")
    with pytest.raises(FileNotFoundError, match=r"1 images in .*images have no mask in .*masks "
                       r"with the same stem \(lonely\); add their masks or move the images out"):
        read_samples(tmp_path, "folder")


def test_folder_with_its_masks_under_another_name_says_what_the_layout_is(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()  # what predict writes, given back as training data
    with pytest.raises(FileNotFoundError, match=r"has no masks/ folder: the folder layout is "
                       r"images/<name>.png with masks/<name>.png of the same name \(found: "
                       r"images/, labels/\)"):
        read_samples(tmp_path, "folder")


def test_missing_root_and_unknown_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.root"):
        read_samples(tmp_path / "nope", "dsb2018")
    with pytest.raises(ValueError, match="unknown data layout"):
        read_samples(tmp_path, "coco")


def test_corrupt_image_names_the_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match="broken.png"):
        read_image(bad)


@pytest.mark.parametrize("shape", [(6, 5), (6, 5, 1), (6, 5, 3), (6, 5, 4)])
@pytest.mark.parametrize("in_channels", [1, 3])
def test_to_channels(shape, in_channels):
    out = to_channels(np.ones(shape, np.uint8), in_channels)
    assert out.shape == (6, 5, in_channels)


def test_percentile_normalisation_handles_16_bit_and_dim_images():
    rng = np.random.default_rng(0)
    dim16 = rng.integers(100, 400, (32, 32, 1)).astype(np.uint16)
    out = normalize(dim16, "percentile")
    assert out.dtype == np.float32
    assert out.min() == 0.0
    assert out.max() == 1.0
    assert normalize(np.full((4, 4, 3), 255, np.uint8), "scale").max() == 1.0
    assert normalize(np.zeros((4, 4, 1), np.uint8), "percentile").max() == 0.0  # all black


def test_labels_from_mask_splits_binary_components():
    mask = np.zeros((8, 8), np.uint8)
    mask[1:3, 1:3] = 255
    mask[5:7, 5:7] = 255
    assert labels_from_mask(mask).max() == 2


def test_zero_byte_image_names_the_file(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.png"):
        read_image(empty)


def test_a_dsb2018_folder_of_broken_links_says_so(tmp_path):
    """sample50's three commands run where the images are not: 50 links to nothing."""
    (tmp_path / "sample50").mkdir()
    for i in ("a1", "b2"):
        (tmp_path / "sample50" / i).symlink_to(tmp_path / "nowhere" / i)
    with pytest.raises(FileNotFoundError, match=r"sample50: its 2 entries are links to nothing "
                       r"\(the first to .*nowhere/a1\); link them to where the images are"):
        read_samples(tmp_path / "sample50", "dsb2018")


def test_folder_without_images_says_so(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    (tmp_path / "images/readme.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match="holds no images"):
        read_samples(tmp_path, "folder")
    with pytest.raises(FileNotFoundError, match="holds no"):
        read_samples(tmp_path / "images", "dsb2018")


def test_to_channels_pixel_values():
    rgba = np.array([[[10, 20, 30, 255], [200, 100, 0, 255]]], np.uint8)
    np.testing.assert_array_equal(to_channels(rgba, 3), rgba[..., :3])  # alpha dropped
    gray = to_channels(rgba, 1)  # ITU-R 601 luma: 0.299 R + 0.587 G + 0.114 B
    np.testing.assert_allclose(gray[..., 0], [[18.15, 118.5]], rtol=1e-6)
    gray_to_rgb = to_channels(np.array([[7, 9]], np.uint8), 3)
    np.testing.assert_array_equal(gray_to_rgb, [[[7, 7, 7], [9, 9, 9]]])
