"""Other microscopes' optics: a model's scores on its own test (or validation) images degraded
as another microscope or camera would give them: blurred (defocus, a lower numerical aperture),
another gamma (another camera's response), fewer photons (Poisson noise), the labels unchanged
(docs/model.md#other-microscopes).

    python scripts/degraded_test.py OUT_DIR [MODEL] [SPLIT] [NAMES]
    (SPLIT: test or val; NAMES: some of DEGRADATIONS, comma-separated, all by default)

Each degradation is applied to the stored image (all channels alike), with a fixed seed, and the
model scored with ``cellseg.eval`` as a user would run it (``diameter=auto``, its tuned
post-processing). Writes OUT_DIR/degraded_<split>.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from scaled_test import SCORES, split_samples, write_folder
from scipy import ndimage

from cellseg import checkpoint
from cellseg.datasets import intensity_limits
from cellseg.eval import evaluate_with


def blur(image: np.ndarray, sigma: float, rng) -> np.ndarray:
    sigmas = (sigma, sigma) + (0,) * (image.ndim - 2)
    return ndimage.gaussian_filter(image.astype(np.float32), sigmas)


def gamma(image: np.ndarray, value: float, rng) -> np.ndarray:
    top = top_value(image)
    return top * (image.astype(np.float32) / top) ** value


def photons(image: np.ndarray, peak: float, rng) -> np.ndarray:
    """Shot noise of an exposure in which the brightest nuclei (where the model's percentile
    normalisation puts 1) caught ``peak`` photons a pixel."""
    bright = max(intensity_limits(image, "percentile")[1], 1.0)
    return rng.poisson(image.astype(np.float32) / bright * peak) / peak * bright


def top_value(image: np.ndarray) -> float:
    """The stored type's largest value (the study's ``scale`` normalisation's 1)."""
    return intensity_limits(image, "scale")[1]


DEGRADATIONS = {  # name: (function, its parameter)
    "as_they_are": (None, None),
    "blur_1px": (blur, 1.0),
    "blur_2px": (blur, 2.0),
    "gamma_0.5": (gamma, 0.5),
    "gamma_2": (gamma, 2.0),
    "photons_100": (photons, 100.0),
    "photons_30": (photons, 30.0),
    "photons_10": (photons, 10.0),
}


def degraded(image: np.ndarray, name: str, rng) -> np.ndarray:
    function, value = DEGRADATIONS[name]
    if function is None:
        return image
    out = function(image, value, rng)
    return np.clip(np.rint(out), 0, top_value(image)).astype(image.dtype)


def main(out: str, model: str = "nuclei", split: str = "test", names: str = "") -> None:
    out_dir = Path(out)
    samples = split_samples(checkpoint.load(model), split)
    results = {}
    for name in names.split(",") if names else DEGRADATIONS:
        rng = np.random.default_rng(0)
        folder = write_folder(out_dir / f"{split}_{name}",
                              ((s.id, degraded(s.image, name, rng), s.labels) for s in samples))
        metrics, _ = evaluate_with([f"model_name={model}", "data=folder",
                                    f"data.root={folder}", "split=all"])
        results[name] = {k: round(float(metrics[k]), 4) for k in SCORES}
        print(name, results[name], flush=True)
    (out_dir / f"degraded_{split}.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    if not 2 <= len(sys.argv) <= 5:
        raise SystemExit(__doc__)
    main(*sys.argv[1:])
