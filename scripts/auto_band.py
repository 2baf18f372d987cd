"""diameter=auto's rule on a model's own validation images at several magnifications: the scores
of variants of the band within which images are segmented as they are (docs/model.md, "The band,
chosen on validation images").

    python scripts/auto_band.py OUT_DIR [MODEL] [VARIANTS] [SPLIT] [SCALES]

VARIANTS (comma-separated): ``today`` (inference.AUTO_BAND as it is), ``LOW:HIGH`` (the band's
factors, e.g. ``0.8:1.25``), ``LOW:HIGH+third`` (the same, with a third pass at the refined
estimate instead of the settled scale, the rule before 2026-12-03) and ``null`` (as they are).
Defaults: the shipped model, ``today,null``, its ``val`` split, scales ``0.5,1,2``. Each image
and its annotations are scaled (``scaled_test.scaled``) and scored through ``cellseg.eval``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from scaled_test import scaled_folder, split_samples

from cellseg import checkpoint, inference
from cellseg.eval import evaluate_with

SCORES = ("map", "map_pooled", "ap50_pooled", "iou_nuclei")
TODAY = (inference.AUTO_BAND, inference.settled_scale)  # the rule as the package has it


def set_rule(variant: str) -> str:
    """Set inference's band (and third pass) for ``variant``; the ``diameter=`` it needs."""
    band, _, third = variant.partition("+")
    inference.AUTO_BAND = (tuple(map(float, band.split(":"))) if ":" in band
                           else TODAY[0])
    inference.settled_scale = (lambda scale, passes: scale) if third else TODAY[1]
    return "null" if variant == "null" else "auto"


def main(out: str, model: str = "nuclei", variants: str = "today,null", split: str = "val",
         scales: str = "0.5,1,2") -> dict:
    samples = split_samples(checkpoint.load(model), split)
    results = {}
    for scale in map(float, scales.split(",")):
        folder = scaled_folder(samples, scale, Path(out) / f"x{scale:g}")
        for variant in variants.split(","):
            diameter = set_rule(variant)
            metrics, _ = evaluate_with([f"model_name={model}", "data=folder",
                                        f"data.root={folder}", "split=all",
                                        f"diameter={diameter}"])
            results[f"{scale:g} {variant}"] = {k: round(float(metrics[k]), 4) for k in SCORES}
            print(scale, variant, results[f"{scale:g} {variant}"], flush=True)
    set_rule("today")
    (Path(out) / "auto_band.json").write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    if not 2 <= len(sys.argv) <= 6:
        raise SystemExit(__doc__)
    main(*sys.argv[1:])
