"""Segmentation scores: pure functions on counts, wrapped as torchmetrics ``Metric`` classes.

Pixel scores are computed on the binary prediction ``sigmoid(logit) > 0.5`` (``logit > 0``)
over the whole set, i.e. from confusion counts summed over every pixel of every image:

- ``iou``: foreground Jaccard, TP / (TP + FP + FN);
- ``miou``: the study's "Mean IoU" (Keras ``MeanIoU(num_classes=2)``), the mean of background
  and foreground IoU, a class whose union is empty being left out of the mean;
- ``dice``: foreground Dice, 2 TP / (2 TP + FP + FN).

A score whose union is empty (no true and no predicted foreground) is 1: nothing to find,
nothing found. Counts are summed across processes, so DDP gives the single-process numbers.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


def confusion_counts(pred: Tensor, target: Tensor) -> Tensor:
    """Return int64 ``[TP, FP, FN, TN]`` of two boolean tensors of the same shape."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    pred, target = pred.bool(), target.bool()
    tp = (pred & target).sum()
    fp = (pred & ~target).sum()
    fn = (~pred & target).sum()
    tn = target.numel() - tp - fp - fn
    return torch.stack([tp, fp, fn, tn]).long()


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    return torch.where(den > 0, num / den.clamp(min=1), torch.ones_like(num, dtype=torch.float))


def foreground_iou(counts: Tensor) -> Tensor:
    """Foreground Jaccard index TP / (TP + FP + FN) from ``[TP, FP, FN, TN]``."""
    tp, fp, fn, _ = counts.double()
    return _ratio(tp, tp + fp + fn).float()


def mean_iou(counts: Tensor) -> Tensor:
    """Mean of background and foreground IoU, as Keras ``MeanIoU(num_classes=2)``."""
    tp, fp, fn, tn = counts.double()
    unions = torch.stack([tn + fp + fn, tp + fp + fn])  # background, foreground
    ious = torch.stack([tn, tp]) / unions.clamp(min=1)
    valid = unions > 0
    if not valid.any():
        return torch.tensor(1.0)
    return ious[valid].mean().float()


def dice(counts: Tensor) -> Tensor:
    """Foreground Dice 2 TP / (2 TP + FP + FN) from ``[TP, FP, FN, TN]``."""
    tp, fp, fn, _ = counts.double()
    return _ratio(2 * tp, 2 * tp + fp + fn).float()


PIXEL_SCORES = {"iou": foreground_iou, "miou": mean_iou, "dice": dice}


class PixelScore(Metric):
    """One pixel score (``iou``, ``miou`` or ``dice``) accumulated over a whole set.

    ``update(logits, target)`` takes logits of any shape and a {0, 1} target of the same shape.
    Instances with the same state share their update inside a ``MetricCollection``.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, score: str = "iou", **kwargs) -> None:
        super().__init__(**kwargs)
        if score not in PIXEL_SCORES:
            raise ValueError(f"unknown pixel score {score!r}; choose from {sorted(PIXEL_SCORES)}")
        self.score = score
        self.add_state("counts", default=torch.zeros(4, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: Tensor, target: Tensor) -> None:
        self.counts += confusion_counts(logits > 0, target > 0.5)

    def compute(self) -> Tensor:
        return PIXEL_SCORES[self.score](self.counts)
