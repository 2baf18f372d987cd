import numpy as np

from cellseg.instances import instances, remove_small


def disc(shape, cy, cx, r):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2


def test_touching_discs_are_split_by_the_distance_watershed():
    prob = (disc((40, 60), 20, 20, 10) | disc((40, 60), 20, 38, 10)).astype(np.float32)
    labels = instances(prob)
    assert labels.dtype == np.int32 and labels.max() == 2
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


def test_empty_probability_map():
    assert instances(np.zeros((16, 16), np.float32)).max() == 0
