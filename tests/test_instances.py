import numpy as np
import pytest
from scipy import ndimage
from skimage.measure import label as connected_components

from cellseg.instances import (
    core_peaks,
    distance_seeds,
    instances,
    labels_from_probs,
    offset_edges,
    remove_small,
)
from cellseg.targets import centre_offsets, targets_from_labels
from helpers import two_peaks


def disc(shape, cy, cx, r):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2


def test_touching_discs_are_split_by_the_distance_watershed():
    prob = (disc((40, 60), 20, 20, 10) | disc((40, 60), 20, 38, 10)).astype(np.float32)
    labels = instances(prob)
    assert labels.dtype == np.int32
    assert labels.max() == 2
    assert labels[20, 15] != labels[20, 43]
    unsplit = instances(prob, split=False)
    assert unsplit.max() == 1


def test_predicted_contours_separate_nuclei():
    shape = (30, 40)
    prob = np.zeros(shape, np.float32)
    prob[5:25, 5:35] = 1.0
    contours = np.zeros(shape, np.float32)
    contours[5:25, 19:21] = 1.0  # a predicted boundary across the blob
    labels = instances(prob, contours=contours, min_size=1)
    assert labels.max() == 2
    assert (labels[prob > 0.5] > 0).all()  # contour pixels are given to a nucleus


def test_small_objects_dropped_and_labels_consecutive():
    labels = np.zeros((10, 10), np.int32)
    labels[0:4, 0:4] = 3
    labels[8, 8] = 7
    out = remove_small(labels, 2)
    assert sorted(np.unique(out).tolist()) == [0, 1]


def test_min_score_drops_objects_by_their_mean_foreground_probability():
    prob = np.zeros((40, 60), np.float32)
    prob[disc(prob.shape, 20, 15, 8)] = 0.95  # sure
    prob[disc(prob.shape, 20, 45, 8)] = 0.6  # doubtful: passes the pixel threshold only just
    prob[20, 40:50] = 1.0  # a sure streak does not save it: its mean is 0.62
    assert instances(prob, split=False).max() == 2  # off by default
    kept = instances(prob, split=False, min_score=0.8)
    assert kept.max() == 1
    assert kept[20, 15] == 1
    assert kept[20, 45] == 0
    assert instances(prob, split=False, min_score=0.6).max() == 2  # at the score: kept
    assert instances(prob, split=False, min_score=0.96).max() == 0


def test_empty_probability_map():
    assert instances(np.zeros((16, 16), np.float32)).max() == 0


def touching_discs():
    """Labels of two overlapping discs (the second drawn over the first) and a 2x2 speck."""
    labels = np.zeros((40, 60), np.int32)
    labels[disc(labels.shape, 20, 20, 10)] = 1
    labels[disc(labels.shape, 20, 37, 10)] = 2
    labels[2:4, 50:52] = 3
    return labels


def test_distance_target_is_one_at_each_centre_and_falls_to_the_own_border():
    labels = touching_discs()
    targets = targets_from_labels(labels, 3)
    assert targets.shape == (40, 60, 3)
    assert targets.dtype == np.float32
    fg, contours, distance = np.moveaxis(targets, -1, 0)
    np.testing.assert_array_equal(fg, labels > 0)
    np.testing.assert_array_equal(targets_from_labels(labels, 2), targets[..., :2])
    assert (distance[labels == 0] == 0).all()
    for k in (1, 2, 3):
        assert distance[labels == k].max() == pytest.approx(1.0)
    assert distance[20, 37] == 1.0  # the undisturbed disc's centre
    # where the discs touch, each is at its own border: its lowest value, 1 / its depth
    assert labels[20, 27] == 2
    assert contours[20, 27] == 1
    assert distance[20, 27] == distance[labels == 2].min() == distance[labels == 2][0]
    assert 0.09 < distance[20, 27] < 0.11  # the disc is about 10 pixels deep
    assert (distance[labels == 3] == 1).all()  # too small for an interior: all core


def test_targets_refuse_an_unknown_channel_count():
    with pytest.raises(ValueError, match="out_channels=4; use 1"):
        targets_from_labels(touching_discs(), 4)


def test_centre_offsets_run_from_0_to_1_across_each_nucleus_and_are_half_elsewhere():
    labels = np.zeros((12, 20), np.int32)
    labels[1:6, 2:11] = 40  # sparse ids, as in a crop
    labels[7:10, 4:7] = 7
    offsets = centre_offsets(labels)
    assert offsets.shape == (12, 20, 2)
    assert offsets.dtype == np.float32
    assert (offsets[labels == 0] == 0.5).all()
    np.testing.assert_allclose(offsets[3, 2:11, 1], np.linspace(0, 1, 9))  # columns, centre 6
    np.testing.assert_allclose(offsets[1:6, 6, 0], [0, 0.25, 0.5, 0.75, 1])  # rows, centre 3
    np.testing.assert_allclose(offsets[7:10, 5, 0], [0, 0.5, 1])
    targets = targets_from_labels(labels, 5)
    np.testing.assert_array_equal(targets[..., 3:], offsets)
    np.testing.assert_array_equal(targets[..., :3], targets_from_labels(labels, 3))


def test_centre_offsets_split_touching_nuclei_that_no_other_channel_splits():
    labels = np.zeros((20, 30), np.int32)
    labels[2:12, 2:14], labels[2:12, 14:26] = 1, 2  # side by side, touching
    probs = targets_from_labels(labels, 5)
    probs[..., 1], probs[..., 2] = 0, labels > 0  # no contour, a flat distance: one core
    edges = offset_edges(probs[..., 3:])
    assert edges[6, 13] == pytest.approx(edges[6, 14]) == pytest.approx(0.45, abs=0.01)  # border
    assert (edges[4:10, 4:12] == 0).all()
    assert (edges[4:10, 16:24] == 0).all()
    assert labels_from_probs(probs[..., :3], min_size=1).max() == 1
    found = labels_from_probs(probs, min_size=1, offset_threshold=0.2)
    assert found.max() == 2
    assert found[6, 5] != found[6, 20]
    assert labels_from_probs(probs, min_size=1).max() == 1  # off (1.0) unless tuned or set


def test_the_distance_channel_splits_nuclei_that_touch_without_a_contour():
    labels = touching_discs()
    fg, _, distance = np.moveaxis(targets_from_labels(labels, 3), -1, 0)
    no_contours = np.zeros_like(fg)
    found = instances(fg, no_contours, distance=distance, min_size=1)
    assert found.max() == 3
    np.testing.assert_array_equal(found > 0, labels > 0)
    assert found[20, 15] != found[20, 43]
    # no core exceeds a seed threshold of 1: no seeds, so each blob stays one nucleus
    assert instances(fg, no_contours, distance=distance, min_size=1, seed_threshold=1.0).max() == 2


def test_contour_threshold_is_its_own_option():
    prob = np.zeros((30, 40), np.float32)
    prob[5:25, 5:35] = 1.0
    contours = np.zeros_like(prob)
    contours[5:25, 19:21] = 0.4  # a faint boundary: splits only below a 0.4 contour threshold
    assert instances(prob, contours, min_size=1).max() == 1
    assert instances(prob, contours, min_size=1, contour_threshold=0.3).max() == 2


def test_labels_from_probs_uses_every_channel_unless_told_and_null_means_default():
    labels = touching_discs()
    probs = targets_from_labels(labels, 3)
    probs[..., 1] = 0  # no contours: only the distance channel can split
    assert labels_from_probs(probs, min_size=1).max() == 3
    assert labels_from_probs(probs[..., :2], min_size=1, split=False).max() == 2
    assert labels_from_probs(probs, use_contours=False, min_size=1, split=False).max() == 2
    # min_size=None is instances()' default (10 pixels): the 4-pixel speck goes
    assert labels_from_probs(probs, min_size=None, threshold=None).max() == 2


def test_touching_weights_mark_where_two_nuclei_meet_and_nowhere_else():
    from cellseg.targets import touching_weights

    labels = touching_discs()  # discs 1 and 2 meet around column 28; speck 3 stands alone
    w = touching_weights(labels, 4.0)
    assert w.shape == labels.shape
    assert w.dtype == np.float32
    assert set(np.unique(w)) == {1.0, 5.0}
    rows, cols = np.nonzero(w == 5.0)
    assert 24 <= cols.min()
    assert cols.max() <= 32
    assert w[20, 28] == 5.0
    assert w[20, 12] == 1.0
    assert w[3, 50] == 1.0
    np.testing.assert_array_equal(touching_weights(np.where(labels == 2, 0, labels), 4.0), 1.0)


def test_seed_h_splits_nuclei_whose_cores_merged_at_their_distance_saddle():
    distance = two_peaks()
    fg = (distance > 0.05).astype(np.float32)
    assert 0.45 < distance[20, 30] < 0.55  # the saddle, above the seed threshold
    merged = instances(fg, distance=distance, seed_threshold=0.3, min_size=1)
    assert merged.max() == 1  # one core: one nucleus
    split = instances(fg, distance=distance, seed_threshold=0.3, min_size=1, seed_h=0.2)
    assert split.max() == 2
    assert split[20, 23] != split[20, 37]
    assert (split[:, :29] != split[20, 37]).all()
    assert (split[:, 31:] != split[20, 23]).all()
    # a dip shallower than seed_h (0.9 - 0.5 from the lower peak) is no second nucleus
    assert instances(fg, distance=distance, seed_threshold=0.3, min_size=1, seed_h=0.6).max() == 1


def test_distance_seeds_keep_a_seed_in_every_core_however_flat():
    distance = 0.35 * two_peaks(separation=30)  # two separate bumps peaking at 0.35 and 0.315
    cores = distance > 0.3
    # both tops are lower than h: plain h-maxima of the distance would find neither
    seeds = distance_seeds(cores, distance, h=0.5)
    assert seeds.max() == 2
    assert seeds[20, 23] == 1
    assert seeds[20, 53] == 2
    assert (seeds[~cores] == 0).all()


def seeds_searching_every_core(cores, distance, h):
    """distance_seeds as it was until 2026-12-04: every core searched alone with h_maxima."""
    smooth = ndimage.gaussian_filter(distance.astype(np.float64), 1.0)
    core_labels = connected_components(cores, connectivity=1)
    seeds, count = np.zeros(cores.shape, np.int32), 0
    for i, box in enumerate(ndimage.find_objects(core_labels), start=1):
        found = connected_components(core_peaks(core_labels[box] == i, smooth[box], h),
                                     connectivity=2)
        seeds[box] = np.where(found > 0, found + count, seeds[box])
        count += int(found.max())
    return seeds


@pytest.mark.parametrize("h", [0.05, 0.3, 1.8])
def test_distance_seeds_equal_searching_every_core_alone(h):
    """Cores with one top skip the search; the seeds and their numbers must not change: single
    bumps, touching pairs, a flat top, ragged noise, and an h deeper than the lift of 1 (where
    a low core's one top is no seed)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:120, :160]
    distance = np.zeros((120, 160))
    for _ in range(40):
        cy, cx, r = rng.uniform(0, 120), rng.uniform(0, 160), rng.uniform(3, 12)
        distance = np.maximum(distance, 1 - np.hypot(yy - cy, xx - cx) / r)
    distance = np.clip(distance + rng.normal(0, 0.05, distance.shape), 0, 1)
    distance[10:20, 10:20] = 0.8  # a plateau
    cores = distance > 0.3
    expected = seeds_searching_every_core(cores, distance, h)
    cores_found = connected_components(cores, connectivity=1).max()
    assert expected.max() != cores_found  # some cores split (h < 1) or left unseeded (h = 1.8)
    np.testing.assert_array_equal(distance_seeds(cores, distance, h), expected)


def test_distance_seeds_search_cores_that_meet_another_at_a_corner():
    """Two cores meeting at one corner: the other core's higher pixel there hides a top of the
    first from the 8-neighbour test (this noise field, found by search, is such a case)."""
    distance = np.random.default_rng(10).uniform(0, 1, (12, 12))
    cores = np.zeros((12, 12), bool)
    cores[2:6, 2:6] = cores[6:10, 6:10] = True
    expected = seeds_searching_every_core(cores, distance, 0.05)
    assert expected.max() == 3
    np.testing.assert_array_equal(distance_seeds(cores, distance, 0.05), expected)


def test_distance_seeds_of_an_empty_image():
    assert distance_seeds(np.zeros((0, 0), bool), np.zeros((0, 0)), 0.3).shape == (0, 0)
    assert distance_seeds(np.zeros((5, 4), bool), np.zeros((5, 4)), 0.3).max() == 0
