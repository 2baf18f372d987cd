"""Score another tool's label images on sample50's 10 test images, as ``cellseg.eval`` scores
cellseg.

    python scripts/score_labels.py PRED_DIR [DATA_ROOT]

``PRED_DIR`` holds ``<id>.png`` (or ``.tif``) instance labels (0 = background) at each image's
own size, e.g. what ``../shared/peers/ref_stardist.py PRED_DIR`` writes. Prints one table row:
``iou`` (foreground IoU summed over the set), ``map`` and ``ap50`` averaged over images, and
``ap50_pooled`` and ``map_pooled`` over all nuclei, through the metric functions eval uses. A
second line gives the true and false positives and the missed nuclei at IoU 0.5, and ``map``
and pooled ap50 of the colour (stained brightfield) and grey (fluorescence, unstained
brightfield) images apart; a third the false and missed ones by kind
(``cellseg.metrics.error_kinds``: merges, pieces, on background, ...).
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from cellseg.datasets import image_kind, read_sample50
from cellseg.files import read_image
from cellseg.metrics import ERROR_KINDS, InstanceScores, error_kinds, pixel_metrics


def main(pred_dir: str, root: str = "../shared/data/dsb2018/stage1_train") -> dict[str, float]:
    samples, split = read_sample50(root)  # its own split, whatever else root holds
    test = split["test"]
    pixel, instance = pixel_metrics(threshold=0.5), InstanceScores()
    kinds = {"colour": InstanceScores(), "grey": InstanceScores()}
    errors = Counter()
    for i in test:
        found = [p for p in Path(pred_dir).glob(f"{i}.*") if p.suffix in (".png", ".tif")]
        if not found:
            raise SystemExit(f"{pred_dir} has no {i}.png or {i}.tif: predict every test image")
        pred = np.squeeze(read_image(found[0])).astype(np.int64)
        true = samples[i].labels
        pixel.update(torch.from_numpy(pred > 0), torch.from_numpy(true > 0))
        instance.update(true, pred)
        kinds[image_kind(samples[i].image)].update(true, pred)
        errors.update(error_kinds(true, pred))
    scores = {"iou": pixel.compute()["iou"], **instance.compute()}
    result = {k: float(v) for k, v in scores.items()}
    print(" | ".join(f"{k} {v:.3f}" for k, v in result.items()))
    tp, fp, fn = instance.counts50.tolist()
    by_kind = []
    for kind, metric in kinds.items():
        if metric.n_images > 0:
            kind_scores = metric.compute()
            by_kind.append(f"{kind} images ({int(metric.n_images)}): "
                           f"map {float(kind_scores['map']):.3f}, "
                           f"ap50_pooled {float(kind_scores['ap50_pooled']):.3f}")
    print(f"at IoU 0.5: {tp} found, {fp} false, {fn} missed | " + " | ".join(by_kind))
    print("by kind: " + ", ".join(f"{k} {errors[k]}" for k in ERROR_KINDS))
    return result


if __name__ == "__main__":
    main(*sys.argv[1:])
