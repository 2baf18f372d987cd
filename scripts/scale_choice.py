"""diameter=auto's choice per image between segmenting it as it is and rescaled, made by the
network's own confidence instead of the size band: scored on a model's images scaled by 0.5x, 1x
and 2x (docs/model.md, "Any magnification").

    python scripts/scale_choice.py [MODEL] [SPLIT]     (defaults: nuclei val)

For each image that diameter=auto rescales, both segmentations are scored (``map``) and three
confidences compared: the mean foreground probability over the nuclei's pixels (``pix``), the
mean of the nuclei's scores (``obj``) and the mean certainty |2p - 1| over all pixels
(``cert``). Printed per scale: today's rule, as they are, each confidence's pick, and the
better of the two per image (``oracle``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from scaled_test import scaled, split_samples

from cellseg import checkpoint
from cellseg.checkpoint import instance_options
from cellseg.inference import choose_scale, segment_rescaled
from cellseg.instances import object_scores
from cellseg.metrics import instance_scores

SETTINGS: dict = {}  # inference defaults (tiles, overlap; no test-time augmentation)


def confidences(foreground: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    inside = labels > 0
    scores = object_scores(labels, foreground)[1:]
    present = np.bincount(labels.ravel(), minlength=len(scores) + 1)[1:] > 0
    return {"pix": float(foreground[inside].mean()) if inside.any() else 0.0,
            "obj": float(scores[present].mean()) if present.any() else 0.0,
            "cert": float(np.abs(2 * foreground - 1).mean())}


def main(model_name: str = "nuclei", split: str = "val") -> None:
    loaded = checkpoint.load(model_name)
    samples = split_samples(loaded, split)
    net, pre = loaded.network(), loaded.preprocessing()
    options = instance_options({}, {"postprocess": loaded.postprocess})
    rows = []
    for scale in (0.5, 1.0, 2.0):
        for sample in samples:
            image, truth = scaled(sample, scale)
            image = image if image.ndim == 3 else image[..., None]
            truth = truth.astype(np.int32)
            chosen, _ = choose_scale(net, image, pre, SETTINGS, options, "auto")
            results = {"as_is": segment_rescaled(net, image, pre, SETTINGS, options, None)}
            results["auto"] = (segment_rescaled(net, image, pre, SETTINGS, options, chosen)
                               if chosen else results["as_is"])
            row = {"scale": scale, "id": sample.id, "chosen": chosen}
            for k, (foreground, labels) in results.items():
                row[f"map_{k}"] = instance_scores(truth, labels)["map"]
                row[f"c_{k}"] = confidences(foreground, labels)
            rows.append(row)
    Path(f"scale_choice_{split}.json").write_text(json.dumps(rows, indent=1))
    for scale in (0.5, 1.0, 2.0):
        r = [x for x in rows if x["scale"] == scale]
        out = {"today": np.mean([x["map_auto"] for x in r]),
               "as_is": np.mean([x["map_as_is"] for x in r]),
               "oracle": np.mean([max(x["map_auto"], x["map_as_is"]) for x in r])}
        for k in ("pix", "obj", "cert"):
            out[k] = np.mean([x["map_auto"] if x["c_auto"][k] >= x["c_as_is"][k]
                              else x["map_as_is"] for x in r])
        print(f"{scale:g}x", {k: round(float(v), 4) for k, v in out.items()},
              "rescaled:", sum(1 for x in r if x["chosen"]), flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 3:
        raise SystemExit(__doc__)
    main(*sys.argv[1:])
