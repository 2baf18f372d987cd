"""Pixel scores against hand-computed cases."""

from pathlib import Path

import numpy as np
import pytest
import torch
from skimage.morphology import binary_dilation, binary_erosion
from torchmetrics import MetricCollection

from cellseg.datasets import read_dsb2018_sample
from cellseg.metrics import (
    InstanceScores,
    PixelScore,
    confusion_counts,
    dice,
    error_kinds,
    foreground_iou,
    instance_scores,
    iou_matrix,
    matching_counts,
    mean_iou,
)
from cellseg.synthetic import make_sample
from helpers import REAL_DATA, needs_real_data

# a 4x4 case: truth covers 4 pixels, prediction 3 of them plus 2 more -> TP 3, FP 2, FN 1, TN 10
TRUTH = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
PRED = torch.tensor([[1, 1, 0, 1], [1, 0, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0]])


def logits(pred):
    return pred.float() * 20 - 10  # sigmoid > 0.5 exactly where pred is 1


def test_confusion_counts():
    assert confusion_counts(PRED, TRUTH).tolist() == [3, 2, 1, 10]


def test_scores_by_hand():
    c = confusion_counts(PRED, TRUTH)
    assert foreground_iou(c).item() == pytest.approx(3 / 6)
    assert dice(c).item() == pytest.approx(6 / 9)
    # background: TN 10 over union TN + FP + FN = 13
    assert mean_iou(c).item() == pytest.approx((10 / 13 + 3 / 6) / 2)


def test_empty_truth_and_empty_prediction_score_one():
    zeros = torch.zeros(4, 4, dtype=torch.long)
    c = confusion_counts(zeros, zeros)
    assert foreground_iou(c).item() == 1.0
    assert dice(c).item() == 1.0
    assert mean_iou(c).item() == 1.0  # foreground left out of the mean, as Keras does


def test_no_predicted_foreground():
    c = confusion_counts(torch.zeros_like(TRUTH), TRUTH)
    assert foreground_iou(c).item() == 0.0
    assert dice(c).item() == 0.0
    assert mean_iou(c).item() == pytest.approx((12 / 16 + 0) / 2)


def test_prediction_on_image_without_nuclei():
    c = confusion_counts(PRED, torch.zeros_like(PRED))
    assert foreground_iou(c).item() == 0.0
    assert mean_iou(c).item() == pytest.approx((11 / 16 + 0) / 2)


def test_metric_accumulates_over_the_whole_set_not_per_image():
    metric = PixelScore("iou")
    metric.update(logits(PRED)[None, None], TRUTH[None, None].float())  # 3 / 6
    metric.update(logits(TRUTH)[None, None], TRUTH[None, None].float())  # 4 / 4
    assert metric.compute().item() == pytest.approx(7 / 10)  # not (0.5 + 1) / 2


def test_collection_shares_state_and_matches_torchmetrics():
    from torchmetrics.classification import (
        BinaryF1Score,
        BinaryJaccardIndex,
        MulticlassJaccardIndex,
    )

    torch.manual_seed(0)
    x, y = torch.randn(6, 1, 16, 16), (torch.rand(6, 1, 16, 16) > 0.6).float()
    ours = MetricCollection({k: PixelScore(k) for k in ("iou", "miou", "dice")})
    ours.update(x[:3], y[:3])
    ours.update(x[3:], y[3:])
    out = ours.compute()
    assert out["iou"] == pytest.approx(BinaryJaccardIndex()(x.sigmoid(), y.long()).item())
    assert out["dice"] == pytest.approx(BinaryF1Score()(x.sigmoid(), y.long()).item())
    keras_miou = MulticlassJaccardIndex(2)((x > 0).long().flatten(), y.long().flatten())
    assert out["miou"] == pytest.approx(keras_miou.item())


def test_unknown_score_is_refused():
    with pytest.raises(ValueError, match="unknown pixel score"):
        PixelScore("accuracy")


# ---- instance scores (the 2018 Data Science Bowl) on hand-built label images -------------


def square_labels(*boxes, shape=(20, 20)):
    labels = np.zeros(shape, np.int32)
    for k, (y0, y1, x0, x1) in enumerate(boxes, start=1):
        labels[y0:y1, x0:x1] = k
    return labels


A_BOX, B_BOX = (1, 5, 1, 5), (10, 16, 10, 16)  # 16 and 36 pixels


def test_perfect_match_scores_one():
    truth = square_labels(A_BOX, B_BOX)
    relabelled = np.where(truth > 0, 3 - truth, 0)  # label ids need not agree
    assert instance_scores(truth, relabelled) == {"map": 1.0, "ap50": 1.0, "f1_50": 1.0}


def test_missed_nucleus():
    truth = square_labels(A_BOX, B_BOX)
    pred = square_labels(B_BOX)
    assert matching_counts(truth, pred, [0.5]).tolist() == [[1, 0, 1]]
    s = instance_scores(truth, pred)
    assert s["map"] == pytest.approx(0.5)
    assert s["ap50"] == pytest.approx(0.5)
    assert s["f1_50"] == pytest.approx(2 / 3)


def test_split_nucleus_gives_one_match_at_most():
    truth = square_labels((0, 10, 0, 10))  # 100 px
    pred = square_labels((0, 10, 0, 6), (0, 10, 6, 10))  # 60 + 40 px
    assert iou_matrix(truth, pred).tolist() == [[0.6, 0.4]]
    counts = matching_counts(truth, pred)
    assert counts[0].tolist() == [1, 1, 0]  # t = 0.50: the 60 % half matches
    assert counts[2].tolist() == [0, 2, 1]  # t = 0.60: IoU must exceed t
    expected = np.mean([1 / 2, 1 / 2] + [0.0] * 8)
    assert instance_scores(truth, pred)["map"] == pytest.approx(expected)


def test_merged_pair_matches_neither_when_equal_halves():
    truth = square_labels((0, 10, 0, 5), (0, 10, 5, 10))
    merged = square_labels((0, 10, 0, 10))
    assert matching_counts(truth, merged, [0.5]).tolist() == [[0, 1, 2]]  # IoU exactly 0.5
    assert instance_scores(truth, merged)["map"] == 0.0


def test_empty_truth_and_prediction():
    empty = np.zeros((8, 8), np.int32)
    assert instance_scores(empty, empty) == {"map": 1.0, "ap50": 1.0, "f1_50": 1.0}
    assert instance_scores(empty, square_labels(A_BOX, shape=(8, 8)))["map"] == 0.0
    assert instance_scores(square_labels(A_BOX, shape=(8, 8)), empty)["map"] == 0.0


def test_instance_metric_averages_over_images():
    truth = square_labels(A_BOX, B_BOX)
    metric = InstanceScores()
    metric.update(truth, truth)  # 1.0
    metric.update([truth], [square_labels(B_BOX)])  # 0.5
    out = metric.compute()
    assert out["map"].item() == pytest.approx(0.75)
    assert metric.n_images.item() == 2


def reference_dsb_score(truth, pred):
    """An independent, direct computation: loops over object pairs and thresholds."""
    t_ids = [i for i in np.unique(truth) if i]
    p_ids = [i for i in np.unique(pred) if i]
    if not t_ids and not p_ids:
        return 1.0
    ious = np.zeros((len(t_ids), len(p_ids)))
    for a, i in enumerate(t_ids):
        for b, j in enumerate(p_ids):
            inter = np.logical_and(truth == i, pred == j).sum()
            ious[a, b] = inter / np.logical_or(truth == i, pred == j).sum()
    scores = []
    for t in np.arange(0.5, 1.0, 0.05):
        matches = ious > t
        tp = int(matches.any(axis=1).sum())
        fp, fn = len(p_ids) - int(matches.any(axis=0).sum()), len(t_ids) - tp
        scores.append(tp / (tp + fp + fn))
    return float(np.mean(scores))


def jitter(truth, rng):
    """Grow, shrink, drop or keep each nucleus, relabelled."""
    pred = np.zeros_like(truth)
    for k in range(1, truth.max() + 1):
        m = truth == k
        choice = rng.integers(4)
        m = binary_dilation(m) if choice == 0 else binary_erosion(m) if choice == 1 else m
        if choice != 2:
            pred[m & (pred == 0)] = k + 100
    return pred


def test_dsb_score_matches_a_direct_computation_on_jittered_labels():
    rng = np.random.default_rng(0)
    for index in range(3):
        _, truth = make_sample(0, index, 96)
        pred = jitter(truth, rng)
        assert instance_scores(truth, pred)["map"] == pytest.approx(
            reference_dsb_score(truth, pred)
        )


@needs_real_data
def test_dsb_score_matches_a_direct_computation_on_real_images():
    rng = np.random.default_rng(1)
    folders = sorted(p for p in REAL_DATA.iterdir() if p.is_dir())
    for folder in folders[:40:8]:
        truth = read_dsb2018_sample(folder).labels
        if truth.size > 100_000:  # keep the quadratic reference quick
            continue
        pred = jitter(truth, rng)
        assert instance_scores(truth, pred)["map"] == pytest.approx(
            reference_dsb_score(truth, pred)
        )


def test_pooled_ap50_counts_every_nucleus_the_same_and_the_mean_every_image():
    one = square_labels(A_BOX)  # found: ap50 1
    three = square_labels(A_BOX, B_BOX, (1, 5, 10, 16))  # none found: ap50 0
    scores = InstanceScores()
    scores.update([one, three], [one, np.zeros_like(three)])
    result = scores.compute()
    assert float(result["ap50"]) == pytest.approx(0.5)  # (1 + 0) / 2 images
    assert float(result["ap50_pooled"]) == pytest.approx(0.25)  # 1 TP / (1 TP + 3 FN)
    # the found square is exact, so at every threshold as at 0.5
    assert float(result["map_pooled"]) == pytest.approx(0.25)
    assert float(result["map"]) == pytest.approx(0.5)


def test_error_kinds_sort_each_false_and_missed_nucleus():
    true, pred = np.zeros((40, 80), np.int32), np.zeros((40, 80), np.int32)
    true[2:12, 2:12], true[2:12, 12:22] = 1, 2
    pred[2:12, 2:22] = 1  # one object over both: a merge
    true[2:12, 30:40] = 3
    pred[2:12, 30:38], pred[2:12, 38:40] = 2, 3  # matched (IoU 0.8), and a piece beside it
    true[20:30, 2:12] = 4
    pred[20:25, 2:12], pred[25:30, 2:12] = 4, 5  # cut in halves (IoU 0.5 each: no match)
    true[20:30, 20:30] = 5  # nothing found there
    true[20:30, 40:50] = 6
    pred[20:26, 40:50], pred[30:35, 40:50] = 6, 6  # 60 % of it, and more background: IoU 0.4
    pred[35:39, 60:70] = 7  # on background
    assert error_kinds(true, pred) == {
        "false_merge": 1, "false_piece": 3, "false_background": 1, "false_shape": 1,
        "missed_merged": 2, "missed_pieces": 1, "missed_unfound": 1, "missed_shape": 1,
    }
    assert matching_counts(true, pred)[0].tolist() == [1, 6, 5]  # the kinds add up
    assert set(error_kinds(true, true).values()) == {0}
    assert error_kinds(true, np.zeros_like(pred))["missed_unfound"] == 6


@needs_real_data
def test_score_labels_script_scores_another_tools_label_images(tmp_path, capsys):
    """scripts/score_labels.py (the peer table's scorer): the true labels score 1, the same
    labels with every image's nuclei merged into one lose every instance score but not iou."""
    import importlib.util

    from PIL import Image

    from cellseg.datasets import read_samples, split_ids

    path = Path(__file__).resolve().parents[1] / "scripts/score_labels.py"
    spec = importlib.util.spec_from_file_location("score_labels", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    samples = {s.id: s for s in read_samples(REAL_DATA, "dsb2018")}
    _, test = split_ids(sorted(samples), 0.2, 0)
    (tmp_path / "true").mkdir()
    (tmp_path / "merged").mkdir()
    for i in test:
        labels = samples[i].labels.astype(np.uint16)
        Image.fromarray(labels).save(tmp_path / "true" / f"{i}.png")
        Image.fromarray((labels > 0).astype(np.uint16)).save(tmp_path / "merged" / f"{i}.png")
    assert script.main(str(tmp_path / "true"), str(REAL_DATA)) == pytest.approx(
        {"iou": 1.0, "map": 1.0, "ap50": 1.0, "f1_50": 1.0, "ap50_pooled": 1.0,
         "map_pooled": 1.0}
    )
    nuclei = sum(int(samples[i].labels.max()) for i in test)
    # the test split holds 3 H&E-stained (colour) images and 7 grey ones
    assert (f"at IoU 0.5: {nuclei} found, 0 false, 0 missed | colour images (3): map 1.000, "
            "ap50_pooled 1.000 | grey images (7): map 1.000") in capsys.readouterr().out
    merged = script.main(str(tmp_path / "merged"), str(REAL_DATA))
    assert merged["iou"] == 1.0
    assert merged["ap50_pooled"] < 0.05
    out = capsys.readouterr().out
    assert f"at IoU 0.5: 0 found, 10 false, {nuclei} missed" in out
    # each image's one object holds over half of two or more of its nuclei
    assert "by kind: false_merge 10, false_piece 0, false_background 0, false_shape 0, " in out
    (tmp_path / "merged" / f"{test[0]}.png").unlink()
    with pytest.raises(SystemExit, match=f"has no {test[0]}.png"):
        script.main(str(tmp_path / "merged"), str(REAL_DATA))
