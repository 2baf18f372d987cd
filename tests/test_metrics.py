"""Pixel scores against hand-computed cases."""

import pytest
import torch
from torchmetrics import MetricCollection

from cellseg.metrics import PixelScore, confusion_counts, dice, foreground_iou, mean_iou

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
