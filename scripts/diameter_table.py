"""Measure ``diameter=``: sample50's 10 test images upscaled 2x, predicted with and without it.

    python scripts/diameter_table.py CKPT [DATA_ROOT]

Prints ``map`` (and ap50) on the unscaled test images, on the 2x-upscaled ones (images linear,
labels nearest) without ``diameter=``, and on the upscaled ones with ``diameter=`` set to their
nuclei's median diameter (what a user measures). The training scale is the checkpoint's
recorded diameter, or the median over the training split's nuclei when it records none.
"""

from __future__ import annotations

import sys

import numpy as np
from omegaconf import OmegaConf

from cellseg import config_dir
from cellseg.checkpoint import load_model, preprocessing
from cellseg.datasets import read_sample50, resize
from cellseg.inference import segment_at_scale
from cellseg.measure import median_diameter
from cellseg.metrics import instance_scores


def main(ckpt: str, root: str = "../shared/data/dsb2018/stage1_train") -> None:
    model = load_model(ckpt)
    pre = preprocessing(model)
    samples, split = read_sample50(root)  # its own split, whatever else root holds
    train, test = split["train"], split["test"]
    if not pre.get("diameter"):
        pre["diameter"] = median_diameter(samples[i].labels for i in train)
        print(f"checkpoint records no diameter; training split median: {pre['diameter']:.1f} px")
    inference = OmegaConf.load(f"{config_dir()}/inference/default.yaml")
    instances = OmegaConf.load(f"{config_dir()}/instances/default.yaml")
    big = [(resize(samples[i].image, tuple(2 * n for n in samples[i].image.shape[:2]), "linear"),
            resize(samples[i].labels, tuple(2 * n for n in samples[i].labels.shape), "nearest"))
           for i in test]
    diameter = median_diameter(labels for _, labels in big)
    runs = {
        "unscaled": [(samples[i].image, samples[i].labels, None) for i in test],
        "2x, no diameter": [(image, labels, None) for image, labels in big],
        f"2x, diameter={diameter:.1f}": [(image, labels, diameter) for image, labels in big],
    }
    print(f"training diameter {pre['diameter']:.1f} px; {len(test)} test images")
    print("| images | map | ap50 |\n|---|---|---|")
    for name, items in runs.items():
        scores = [
            instance_scores(labels, segment_at_scale(model, image, pre, inference, instances, d)[1])
            for image, labels, d in items
        ]
        print(f"| {name} | {np.mean([s['map'] for s in scores]):.3f} "
              f"| {np.mean([s['ap50'] for s in scores]):.3f} |", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
