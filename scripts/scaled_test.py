"""Any magnification without being told: a model's scores on its 10 test images as they are and
scaled by 0.5x and 3x (labels with them), with diameter=auto (the default) and without
(diameter=null), and the size estimate's error (docs/model.md).

    python scripts/scaled_test.py OUT_DIR [MODEL] [SCALES]     (SCALES: 0.5,1,3)

The estimate's error: the median equivalent diameter that diameter=auto finds against the
annotated nuclei's median, per image (the log's "nuclei about N px across" lines). "1x_resized":
the model's labels of the unscaled images, resized to each scale (nearest, as the annotations
are) and scored against the scaled annotations: what a model reaches that segments the scaled
images as well as the originals, so the gap to it is the information the scaling took away.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from cellseg import checkpoint
from cellseg.checkpoint import instance_options
from cellseg.datasets import resize, run_sources
from cellseg.eval import evaluate_with
from cellseg.files import save_png
from cellseg.inference import estimate_diameter, segment_at_scale
from cellseg.measure import median_diameter
from cellseg.metrics import InstanceScores

SCORES = ("map", "ap50_pooled", "iou_nuclei")


def split_samples(loaded, split: str) -> list:
    """A loaded model's samples of one split (train, val or test), read from the roots it was
    trained on, their ids file-safe (a pool id is ``dsb2018-pool/<id>``)."""
    sources = run_sources(loaded.data["hparams"])
    return [replace(sources[i].read(), id=i.replace("/", "_"))
            for i in loaded.data["splits"][split]]


def scaled(sample, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """A sample's image and labels resized by ``scale`` (labels nearest)."""
    if scale == 1:
        return sample.image, sample.labels
    h, w = sample.labels.shape
    size = (round(h * scale), round(w * scale))
    image = resize(sample.image, size, "area" if scale < 1 else "linear")
    return np.clip(image, 0, 255).astype(sample.image.dtype), resize(sample.labels, size, "nearest")


def scaled_folder(samples: list, scale: float, folder: Path) -> Path:
    return write_folder(folder, ((s.id, *scaled(s, scale)) for s in samples))


def write_folder(folder: Path, items) -> Path:
    """A ``data=folder`` root of (id, image, labels) items: images/<id>.png, masks/<id>.png."""
    for sub in ("images", "masks"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for name, image, labels in items:
        save_png(folder / "images" / f"{name}.png", image)
        save_png(folder / "masks" / f"{name}.png", labels.astype(np.uint16))
    return folder


def resized_reference(unscaled: list[np.ndarray], samples: list, scale: float) -> dict:
    """``map`` and ``ap50_pooled`` of the unscaled images' labels resized by ``scale``."""
    scores = InstanceScores()
    for s, labels in zip(samples, unscaled, strict=True):
        truth = scaled(s, scale)[1]
        scores.update(truth.astype(np.int32), resize(labels, truth.shape, "nearest"))
    result = scores.compute()
    return {k: round(float(result[k]), 4) for k in ("map", "ap50_pooled")}


def main(out: str, model: str = "nuclei", scales: str = "0.5,1,3") -> None:
    out_dir = Path(out)
    loaded = checkpoint.load(model)
    samples = split_samples(loaded, "test")
    pre = loaded.preprocessing()
    options = instance_options({}, {"postprocess": loaded.postprocess})
    unscaled = [segment_at_scale(loaded.net, s.image, pre, {}, options, "auto")[1]
                for s in samples]
    results = {}
    for scale in map(float, scales.split(",")):
        folder = scaled_folder(samples, scale, out_dir / f"x{scale:g}")
        errors = []
        for s in samples:  # the estimate against the annotated nuclei's median size
            image, labels = scaled(s, scale)
            found = estimate_diameter(loaded.net, image, pre, {}, options)
            truth = median_diameter([labels])
            errors.append(abs(np.log(found / truth)) if found else float("inf"))
        row = {"estimate_error_median": round(float(np.exp(np.median(errors)) - 1), 3),
               "estimate_error_max": round(float(np.exp(np.max(errors)) - 1), 3)}
        for diameter in ("auto", "null"):
            metrics, _ = evaluate_with([f"model_name={model}", "data=folder",
                                        f"data.root={folder}", "split=all",
                                        f"diameter={diameter}"])
            row[diameter] = {k: round(float(metrics[k]), 4) for k in SCORES}
        row["1x_resized"] = resized_reference(unscaled, samples, scale)
        results[f"{scale:g}"] = row
        print(scale, row, flush=True)
    (out_dir / "scaled.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    if not 2 <= len(sys.argv) <= 4:
        raise SystemExit(__doc__)
    main(*sys.argv[1:])
