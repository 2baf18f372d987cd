"""StarDist2D trained on the shipped model's images: the peer of ``experiment=general``.

``../shared/peers/ref_stardist.py`` reads one Kaggle-layout root and chooses its best weights and
thresholds on the 10 test images. This copy trains on the general recipe's own split (the
sample's 40 training images plus the dsb2018-pool folder, the same 34 images held out for
validation, on which StarDist keeps its best weights and optimises its thresholds) and predicts
the sample's 10 test images, never seen before. Two steps, two virtual environments (TensorFlow
and the project's torch do not share one):

    .venv/bin/python scripts/stardist_pool.py split ../shared/data split.json
    peer-sd/bin/python scripts/stardist_pool.py train split.json PRED_DIR [--patches 18800]
    .venv/bin/python scripts/score_labels.py PRED_DIR          # the table row

``peer-sd`` as in the peer script: ``python3 -m venv peer-sd && peer-sd/bin/pip install stardist
csbdeep tensorflow-cpu pillow``. Preparation and augmentation are the peer script's (grey = mean
of RGB, inverted when bright, normalised to percentiles 1 and 99.8; flips, transposes, intensity).
Patches of 256² drawn image by image, as StarDist draws them (images smaller than a patch are
padded with background). ``--patches`` 18,800 of 256² are the pixels of the general recipe's
75,000 crops of 128². Writes PRED_DIR/<id>.png (16-bit labels) and PRED_DIR_timing.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np


def write_split(data_dir: str, out: str) -> None:
    """The general recipe's split (data.test_size=0.2, data.val_size=0.1, data.split_seed=0) as
    image and mask paths, from cellseg's own functions."""
    from cellseg.datasets import all_sources, make_splits, sample50_split

    sample, pool = Path(data_dir) / "dsb2018" / "stage1_train", Path(data_dir) / "dsb2018-pool"
    sources = all_sources(sample, "dsb2018", None, [pool])
    extra = [i for i in sources if "/" in i]
    splits = make_splits(sorted(set(sources) - set(extra)), 0.2, 0.1, 0, extra)
    if sorted(splits["test"]) != sorted(sample50_split()["test"]):
        raise SystemExit(f"{sample} is not the 50-image sample: its test split differs")

    def paths(i: str) -> dict[str, str]:
        if "/" in i:
            stem = i.split("/", 1)[1]
            return {"id": stem, "image": f"{pool}/images/{stem}.png",
                    "masks": f"{pool}/masks/{stem}.png"}
        return {"id": i, "image": f"{sample}/{i}/images/{i}.png", "masks": f"{sample}/{i}/masks"}

    split = {name: [paths(i) for i in ids] for name, ids in splits.items()}
    Path(out).write_text(json.dumps(split, indent=1))
    print(", ".join(f"{len(v)} {k}" for k, v in split.items()), "->", out)


def load_image(path: str) -> np.ndarray:
    from csbdeep.utils import normalize
    from PIL import Image

    grey = np.asarray(Image.open(path).convert("RGB")).astype(np.float32).mean(-1)
    if grey.mean() > 100:
        grey = 255 - grey
    return normalize(grey, 1, 99.8, axis=None).astype(np.float32)


def read_labels(masks: str) -> np.ndarray:
    """A split entry's labels: a Kaggle masks folder (one file per nucleus) or a label image."""
    from PIL import Image

    if not os.path.isdir(masks):
        return np.asarray(Image.open(masks)).astype(np.int32)
    labels = None
    for k, name in enumerate(sorted(os.listdir(masks)), 1):
        mask = np.asarray(Image.open(f"{masks}/{name}"))
        labels = np.zeros(mask.shape[:2], np.int32) if labels is None else labels
        labels[(mask[..., 0] if mask.ndim == 3 else mask) > 0] = k
    return labels


def load_labels(masks: str) -> np.ndarray:
    from stardist import fill_label_holes

    return fill_label_holes(read_labels(masks))


def pad_to(x: np.ndarray, y: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    pad = [(0, max(0, size - n)) for n in x.shape]
    return np.pad(x, pad), np.pad(y, pad)


def load_pairs(entries: list[dict], patch: int) -> tuple[list, list]:
    """Images and labels of a split's entries, each at least one patch a side."""
    pairs = [pad_to(load_image(e["image"]), load_labels(e["masks"]), patch) for e in entries]
    return [x for x, _ in pairs], [y for _, y in pairs]


def augmenter(x, y):  # the peer script's, as in the StarDist 2D training example
    perm = tuple(np.random.permutation(2))
    x, y = x.transpose(perm), y.transpose(perm)
    for ax in (0, 1):
        if np.random.rand() > 0.5:
            x, y = np.flip(x, ax), np.flip(y, ax)
    x = x * np.random.uniform(0.6, 2) + np.random.uniform(-0.2, 0.2)
    return x + 0.02 * np.random.uniform(0, 1) * np.random.normal(0, 1, x.shape), y


def train(split_file: str, pred_dir: str, patches: int, patch: int, bs: int, steps: int,
          budget_s: float, model_dir: str) -> None:
    from csbdeep.utils.tf import keras_import
    from PIL import Image
    from stardist.models import Config2D, StarDist2D

    callback = keras_import("callbacks", "Callback")
    np.random.seed(0)
    split = json.loads(Path(split_file).read_text())
    X, Y = load_pairs(split["train"], patch)
    Xv, Yv = load_pairs(split["val"], patch)
    epochs = -(-patches // (steps * bs))
    conf = Config2D(n_rays=32, grid=(2, 2), n_channel_in=1, use_gpu=False,
                    train_patch_size=(patch, patch), train_batch_size=bs, train_epochs=epochs,
                    train_steps_per_epoch=steps, train_tensorboard=False)
    print(f"{len(X)} training, {len(Xv)} validation images; {epochs} epochs x {steps} steps x "
          f"{bs} patches of {patch}^2", flush=True)
    model = StarDist2D(conf, name="stardist_pool", basedir=model_dir)
    t0, c0 = time.time(), time.process_time()

    class Budget(callback):
        def on_train_batch_end(self, batch, logs=None):
            if time.time() - t0 > budget_s:
                self.model.stop_training = True

    model.prepare_for_training()
    model.callbacks.append(Budget())
    history = model.train(X, Y, validation_data=(Xv, Yv), augmenter=augmenter, seed=0)
    info = dict(peer="stardist", train_images=len(X), val_images=len(Xv), patch=patch, bs=bs,
                steps=steps, epochs=epochs, epochs_done=len(history.history["loss"]),
                train_wall_s=round(time.time() - t0, 1),
                train_cpu_s=round(time.process_time() - c0, 1))
    t1 = time.time()
    model.optimize_thresholds(Xv, Yv)  # on the validation images, never the test ones
    info["optimize_thresholds_s"] = round(time.time() - t1, 1)
    model = StarDist2D(None, name="stardist_pool", basedir=model_dir)  # its best weights
    info["thresholds"] = dict(prob=float(model.thresholds.prob), nms=float(model.thresholds.nms))
    os.makedirs(pred_dir, exist_ok=True)
    t2 = time.time()
    for s in split["test"]:
        x = load_image(s["image"])
        labels = model.predict_instances(x, n_tiles=model._guess_n_tiles(x),
                                         show_tile_progress=False)[0]
        Image.fromarray(labels.astype(np.uint16)).save(f"{pred_dir}/{s['id']}.png")
    info["predict_wall_s"] = round(time.time() - t2, 1)
    print(json.dumps(info), flush=True)
    Path(f"{pred_dir.rstrip('/')}_timing.json").write_text(json.dumps(info))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    steps = parser.add_subparsers(dest="step", required=True)
    s = steps.add_parser("split", help="write the general recipe's split (cellseg's venv)")
    s.add_argument("data_dir")
    s.add_argument("out")
    t = steps.add_parser("train", help="train, tune on validation, predict the test images")
    t.add_argument("split")
    t.add_argument("pred_dir")
    t.add_argument("--patches", type=int, default=18800)
    t.add_argument("--patch", type=int, default=256)
    t.add_argument("--bs", type=int, default=4)
    t.add_argument("--steps", type=int, default=47)
    t.add_argument("--budget-s", type=float, default=4500, help="stop training after this (s)")
    t.add_argument("--model-dir", default="peer_models")
    a = parser.parse_args(argv)
    if a.step == "split":
        write_split(a.data_dir, a.out)
    else:
        train(a.split, a.pred_dir, a.patches, a.patch, a.bs, a.steps, a.budget_s, a.model_dir)


if __name__ == "__main__":
    main(sys.argv[1:])
