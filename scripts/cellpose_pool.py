"""Cellpose 3 trained on the shipped model's images: the peer of ``experiment=general``.

``../shared/peers/ref_cellpose.py`` reads one Kaggle-layout root (the sample's 40 training
images) and leaves its thresholds to be chosen on the 10 test images. This copy trains on the
general recipe's own split (the sample's 40 training images plus the dsb2018-pool folder), chooses
cellpose's two thresholds on the same 34 validation images that tune cellseg's post-processing,
and predicts the sample's 10 test images, never seen before. Two steps, two virtual environments:

    .venv/bin/python scripts/stardist_pool.py split ../shared/data split.json
    peer-cp/bin/python scripts/cellpose_pool.py split.json PRED_DIR --batches 3000
    .venv/bin/python scripts/score_labels.py PRED_DIR          # the table row

``peer-cp`` as in the peer script: ``python3 -m venv peer-cp && peer-cp/bin/pip install "cellpose<4"
pillow torch==2.14.1``. 3,000 batches are the pixels of 73,500 crops of 128², 98 % of ``general``'s
(77 minutes on 2 cores, 2026-12-05). Everything else is the peer script's recipe: grey = mean of
RGB, inverted when bright, normalised to percentiles 1 and 99.8;
``CellposeModel(pretrained_model=None, diam_mean=17, nchan=2)``; ``train.train_seg`` with AdamW at
0.005, batches of 8 patches of 224² at native resolution (``rescale=False``), one batch per cellpose
"epoch" so that its schedule (10-batch warm-up, halving over the last 50 or 100) plays out; images
drawn uniformly, as cellpose draws them. Training passes run under bf16 autocast, as cellseg trains
(``scripts/cellpose_bf16.py``). The thresholds: flow 0.4 (cellpose's default) or off, by cellprob
-1, 0 or 1, the grid of docs/results.md#the-cellpose-run, the best pooled ``map`` (matches over all
validation nuclei, IoU 0.5-0.95, ``cellpose.metrics.average_precision``) chosen. Writes
PRED_DIR/<id>.png (16-bit labels) and PRED_DIR_timing.json (times, the grid's validation scores, the
thresholds chosen).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

GRID = [(flow, prob) for flow in (0.4, 0.0) for prob in (-1.0, 0.0, 1.0)]
IOUS = np.arange(0.5, 1.0, 0.05)


def load_image(path: str) -> np.ndarray:
    """The peer script's preparation: grey, dark background, percentiles 1 and 99.8 to 0 and 1."""
    grey = np.asarray(Image.open(path).convert("RGB")).astype(np.float32).mean(-1)
    if grey.mean() > 100:
        grey = 255 - grey
    lo, hi = np.percentile(grey, [1, 99.8])
    return ((grey - lo) / (hi - lo + 1e-20)).astype(np.float32)


def pooled_map(true: list[np.ndarray], pred: list[np.ndarray]) -> float:
    """``map_pooled`` as cellseg defines it: TP / (TP + FP + FN) over all images' nuclei at each
    IoU threshold 0.5-0.95, averaged over the thresholds."""
    from cellpose.metrics import average_precision

    _, tp, fp, fn = average_precision(true, pred, threshold=list(IOUS))
    tp, fp, fn = tp.sum(0), fp.sum(0), fn.sum(0)
    return float(np.mean(tp / np.maximum(tp + fp + fn, 1)))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("split")
    parser.add_argument("pred_dir")
    parser.add_argument("--batches", type=int, default=3000, help="batches of 8 patches of 224²")
    parser.add_argument("--model-dir", default="peer_models/cellpose_pool")
    parser.add_argument("--skip-train", action="store_true", help="predict with a trained model")
    parser.add_argument("--threads", type=int, default=None)
    a = parser.parse_args(argv)

    import torch
    from cellpose import io, models, resnet_torch, train
    from cellpose_bf16 import forward  # training passes in bf16, prediction in fp32
    from stardist_pool import read_labels  # its split's labels, without stardist
    # (both beside this script: on sys.path as `python scripts/cellpose_pool.py` runs it)

    io.logger_setup()
    torch.manual_seed(0)
    np.random.seed(0)
    if a.threads:
        torch.set_num_threads(a.threads)
    split = json.loads(Path(a.split).read_text())
    info: dict = dict(peer="cellpose", batches=a.batches, bs=8, patch=224, diam_mean=17)
    t0, c0 = time.time(), time.process_time()
    if not a.skip_train:
        X = [load_image(s["image"]) for s in split["train"]]
        Y = [read_labels(s["masks"]) for s in split["train"]]
        print(f"{len(X)} training images; {a.batches} batches of 8 x 224^2", flush=True)
        resnet_torch.CPnet.forward = forward
        os.makedirs(a.model_dir, exist_ok=True)
        model = models.CellposeModel(gpu=False, pretrained_model=None, diam_mean=17.0, nchan=2)
        _, losses, _ = train.train_seg(
            model.net, X, Y, batch_size=8, n_epochs=a.batches, nimg_per_epoch=8,
            save_path=a.model_dir, save_every=50, rescale=False, model_name="cp_pool",
            min_train_masks=1, channels=[0, 0], normalize=False,
        )
        info.update(train_images=len(X), train_wall_s=round(time.time() - t0, 1),
                    train_cpu_s=round(time.process_time() - c0, 1),
                    final_train_loss=round(float(np.mean(losses[-50:])), 4))
        print(json.dumps(info), flush=True)
    model = models.CellposeModel(gpu=False, pretrained_model=f"{a.model_dir}/models/cp_pool",
                                 nchan=2)

    def predict(x: np.ndarray, flow: float, prob: float) -> np.ndarray:
        return model.eval(x, channels=[0, 0], normalize=False, rescale=1.0,
                          flow_threshold=flow, cellprob_threshold=prob)[0].astype(np.uint16)

    t1 = time.time()
    val = [(load_image(s["image"]), read_labels(s["masks"])) for s in split["val"]]
    scores = {f"flow {f} cellprob {p}": pooled_map([y for _, y in val],
                                                  [predict(x, f, p) for x, _ in val])
              for f, p in GRID}
    best = max(scores, key=scores.get)
    flow, prob = GRID[list(scores).index(best)]
    info.update(val_images=len(val), val_map_pooled=scores, chosen=best,
                choose_wall_s=round(time.time() - t1, 1))
    print(json.dumps(scores), "->", best, flush=True)
    os.makedirs(a.pred_dir, exist_ok=True)
    t2 = time.time()
    for s in split["test"]:
        Image.fromarray(predict(load_image(s["image"]), flow, prob)).save(
            f"{a.pred_dir}/{s['id']}.png")
    info["predict_wall_s"] = round(time.time() - t2, 1)
    print(json.dumps(info), flush=True)
    Path(f"{a.pred_dir.rstrip('/')}_timing.json").write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
