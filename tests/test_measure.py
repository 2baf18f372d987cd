"""``cellseg.measure`` on hand-built label and intensity images."""

import math

import numpy as np
import pytest

from cellseg.measure import measure, median_diameter, summarize


def two_nuclei():
    labels = np.zeros((10, 12), np.int32)
    labels[1:3, 1:5] = 1  # 2 x 4 = 8 px
    labels[5:8, 6:9] = 4  # 3 x 3 = 9 px
    dapi = np.zeros((10, 12), np.uint16)
    dapi[1:3, 1:5] = 100
    dapi[5:8, 6:9] = 200
    dapi[7, 8] = 290
    gfp = np.full((10, 12), 7, np.uint16)
    return labels, np.stack([dapi, gfp], axis=-1)


def test_measurements_per_nucleus_in_every_channel_and_in_square_micrometres():
    labels, image = two_nuclei()
    rows = measure(labels, image, ["DAPI", "GFP"], (0.5, 0.25), image="a", t=0, z=2)
    assert [r["label"] for r in rows] == [1, 4]
    first, second = rows
    assert (first["image"], first["t"], first["z"]) == ("a", 0, 2)
    assert first["area_px"] == 8
    assert first["area_um2"] == 8 * 0.125
    assert (first["centroid_y"], first["centroid_x"]) == (1.5, 2.5)
    assert (first["bbox_y0"], first["bbox_x0"], first["bbox_y1"], first["bbox_x1"]) == (1, 1, 3, 5)
    assert first["equivalent_diameter_px"] == pytest.approx(math.sqrt(4 * 8 / math.pi))
    assert first["solidity"] == 1.0
    assert second["eccentricity"] == pytest.approx(0.0)
    assert first["mean_DAPI"] == 100
    assert first["integrated_DAPI"] == 800
    assert second["mean_DAPI"] == pytest.approx((8 * 200 + 290) / 9)
    assert second["max_DAPI"] == 290
    assert second["integrated_DAPI"] == 8 * 200 + 290
    assert second["mean_GFP"] == 7
    assert second["integrated_GFP"] == 63
    assert measure(labels, image, ["DAPI", "GFP"])[0]["area_um2"] == ""  # no pixel size
    assert "score" not in first  # no probabilities given


def test_each_nucleus_scores_its_mean_foreground_probability():
    labels, image = two_nuclei()
    foreground = np.where(labels == 1, 0.9, 0.0)
    foreground[5:8, 6:9] = 0.6
    foreground[7, 8] = 0.96
    rows = measure(labels, image, ["DAPI", "GFP"], foreground=foreground)
    assert [r["score"] for r in rows] == pytest.approx([0.9, (8 * 0.6 + 0.96) / 9])


def test_summary_counts_areas_and_fraction():
    labels, _ = two_nuclei()
    row = summarize(labels, (0.5, 0.5), image="a", t=0, z=0)
    assert row["nuclei"] == 2
    assert row["mean_area_px"] == 8.5
    assert row["median_area_px"] == 8.5
    assert row["mean_area_um2"] == 8.5 * 0.25
    assert row["area_fraction"] == 17 / 120
    empty = summarize(np.zeros((4, 4), np.int32))
    assert empty["nuclei"] == 0
    assert empty["mean_area_px"] == 0.0
    assert empty["area_fraction"] == 0


def test_median_diameter_of_the_nuclei_of_several_images():
    a = np.zeros((20, 20), np.int32)
    a[:2, :2] = 1  # 4 px
    a[5:8, 5:8] = 2  # 9 px
    b = np.zeros((20, 20), np.int32)
    b[10:14, 10:14] = 7  # 16 px
    assert median_diameter([a, b]) == pytest.approx(math.sqrt(4 * 9 / math.pi))
    assert median_diameter([np.zeros((3, 3), np.int32)]) is None


def test_measurements_equal_regionprops_on_real_nuclei():
    from PIL import Image
    from skimage.measure import regionprops_table

    from cellseg.samples import sample_path

    labels = np.asarray(Image.open(sample_path("nuclei").with_name("nuclei_labels.png")))
    labels = labels.astype(np.int32)
    image = np.asarray(Image.open(sample_path("nuclei")))[..., None]
    rows = measure(labels, image, ["dapi"])
    props = ("label", "area", "centroid", "bbox", "equivalent_diameter_area", "eccentricity",
             "solidity", "intensity_mean", "intensity_max")
    want = regionprops_table(labels, image, properties=props)
    assert [r["label"] for r in rows] == list(want["label"])
    for ours, theirs in (("area_px", "area"), ("centroid_y", "centroid-0"),
                         ("centroid_x", "centroid-1"), ("bbox_y0", "bbox-0"),
                         ("bbox_x1", "bbox-3"), ("solidity", "solidity"),
                         ("equivalent_diameter_px", "equivalent_diameter_area"),
                         ("mean_dapi", "intensity_mean-0"), ("max_dapi", "intensity_max-0")):
        assert [r[ours] for r in rows] == pytest.approx(list(want[theirs]), abs=1e-9), ours
    assert [r["eccentricity"] for r in rows] == pytest.approx(list(want["eccentricity"]),
                                                              abs=1e-5)
    assert len(rows) == 89


def test_convex_areas_equal_regionprops():
    """Exact, on shapes with holes, several pieces, one pixel, one row, the image's edges."""
    from skimage.measure import label as components
    from skimage.measure import regionprops_table

    from cellseg.measure import convex_areas, nuclei_pixels

    def hulls(labels):
        return convex_areas(*nuclei_pixels(labels)).tolist()

    rng = np.random.default_rng(0)
    for k in range(60):
        fill = rng.random((30, 41)) < rng.uniform(0.05, 0.6)
        labels = components(fill) if k % 2 else fill * rng.integers(1, 6, size=fill.shape)
        want = regionprops_table(labels, properties=("area_convex",))["area_convex"]
        assert hulls(labels) == want.tolist(), k
    labels = np.zeros((9, 9), np.int32)
    labels[0, 0], labels[4, 2:7], labels[8, 8], labels[2:5, 8] = 3, 5, 9, 9
    assert hulls(labels) == [1, 5, 7]  # 9: two pieces of a column, and the gap
    assert hulls(np.zeros((4, 4), np.int32)) == []


def test_pixel_sums_of_any_labels_asked_for():
    """Sums and maxima per asked label, whichever labels are asked for (absent ones: 0)."""
    from cellseg.measure import pixel_sums

    labels = np.array([[1, 1, 0], [0, 3, 3]], np.int32)
    intensity = np.array([[2, 5, 9], [9, 4, 7]], np.uint8)[..., None]
    sums = pixel_sums(labels, intensity, np.array([3, 2, 1]))
    assert sums["sum"][0].tolist() == [11.0, 0.0, 7.0]
    assert sums["max"][0].tolist() == [7, 0, 5]
    empty = pixel_sums(np.zeros((2, 3), np.int32), intensity, np.array([1]))
    assert empty["max"][0].tolist() == [0]
