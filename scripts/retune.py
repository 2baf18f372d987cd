"""Tune a trained checkpoint's post-processing again, as training does at its end, in place.

    python scripts/retune.py CKPT [SCORE] [DATA_ROOT]

For checkpoints tuned before the search changed (``SCORE`` ``map_pooled``, the default since
2026-11-30, or ``map``; new options such as ``offset_threshold``): the validation images the
checkpoint records are predicted once, the options searched with ``cellseg.tune``'s search
for the best ``SCORE``, and the checkpoint's ``postprocess`` entry replaced (the old one is
printed first; the weights are not touched). ``DATA_ROOT`` where the training data has moved.
Then ``python -m cellseg.eval ckpt_path=CKPT`` scores the test images with the new options.
"""

from __future__ import annotations

import sys

import torch

from cellseg.datamodule import describe_data
from cellseg.datasets import iter_samples, list_sources
from cellseg.inference import load_model, preprocessing
from cellseg.tune import TunePostprocessing, options_text


def main(ckpt: str, score: str = "map_pooled", root: str | None = None) -> dict:
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    data = describe_data(checkpoint)
    if not data["splits"].get("val") or data["splits"]["val"] == data["splits"].get("test"):
        raise SystemExit(f"{ckpt} holds out no validation images of its own: nothing to tune on")
    hp = data["hparams"]
    val = set(data["splits"]["val"])
    sources = [s for s in list_sources(root or hp["root"], hp["layout"], hp.get("channel"))
               if s.id in val]
    if len(sources) != len(val):
        raise SystemExit(f"{len(val) - len(sources)} validation images of {ckpt} are not in "
                         f"{root or hp['root']}; pass DATA_ROOT=<where they are now>")
    old = checkpoint.get("postprocess") or {}
    print(f"before: {options_text(old.get('instances', {})) or 'not tuned'}")
    model = load_model(ckpt)
    samples = list(iter_samples(sources, "Reading validation images"))
    result = TunePostprocessing(score=score).tune(model, samples, preprocessing(model))
    checkpoint["postprocess"] = result
    torch.save(checkpoint, ckpt)
    print(f"after ({score} {result[score]:.3f} on {len(samples)} validation images, defaults "
          f"{result[f'{score}_defaults']:.3f}): {options_text(result['instances'])}")
    return result


if __name__ == "__main__":
    main(*sys.argv[1:])
