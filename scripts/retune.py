"""Tune a trained checkpoint's post-processing again, as training does at its end, in place.

    python scripts/retune.py CKPT [SCORE] [DATA_ROOT]

For checkpoints tuned before the search changed (``SCORE`` ``map_pooled``, the default since
2026-11-30, or ``map``; new options such as ``offset_threshold`` or ``min_score``). The images
the checkpoint was tuned on (its own validation images, or its training images for a run with
``callbacks.tune_postprocess.images=train``) are predicted once, the options searched with
``cellseg.tune``'s search for the best ``SCORE``, and the checkpoint's ``postprocess`` entry
replaced (the old options are printed first; the weights are not touched; the file is replaced
atomically). Only the file named changes: a run's other checkpoints (``epoch_*.ckpt``) keep
theirs. The search uses the callback's default settings. ``DATA_ROOT``: the folder the training
data is in now, if it has moved (a run's extra folders, ``data.train_roots``, are read where
it read them). Then ``python -m cellseg.eval ckpt_path=CKPT`` scores the test
images with the new options.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from cellseg.checkpoint import describe_data, load_model, preprocessing
from cellseg.datasets import iter_samples, run_sources
from cellseg.files import atomic
from cellseg.train import read_checkpoint
from cellseg.tune import SCORES, TunePostprocessing, options_text

USAGE = "usage: python scripts/retune.py CKPT [map_pooled|map] [DATA_ROOT]"


def checkpoint_file(ckpt: str) -> dict:
    """The checkpoint (cellseg.train's reader), or the reason it is none, in one line."""
    if not Path(ckpt).is_file():
        raise SystemExit(f"{ckpt} does not exist: pass a .ckpt written by python -m cellseg.train")
    try:
        return read_checkpoint(ckpt)
    except ValueError as err:
        raise SystemExit(str(err)) from None


def main(ckpt: str, score: str = "map_pooled", root: str | None = None) -> dict:
    if score not in SCORES:
        raise SystemExit(f"score {score!r}: use map_pooled or map ({USAGE})")
    checkpoint = checkpoint_file(ckpt)
    data = describe_data(checkpoint)
    old = checkpoint.get("postprocess") or {}
    split = old.get("split", "val")  # tuned on the training images: tuned there again
    ids = data["splits"].get(split) or []
    if not ids or (split == "val" and sorted(ids) == sorted(data["splits"].get("test", []))):
        raise SystemExit(
            f"{ckpt} holds out no validation images of its own and was not tuned on its training "
            "images: nothing to tune on (train with data.val_size=0.1, or with "
            "callbacks.tune_postprocess.images=train)"
        )
    root = root or data["hparams"]["root"]
    wanted = set(ids)
    kind = {"val": "validation", "train": "training"}[split]
    found = run_sources(data["hparams"], root) if Path(root).is_dir() else {}
    sources = [s for i, s in found.items() if i in wanted]
    if len(sources) != len(wanted):
        raise SystemExit(
            f"{len(wanted) - len(sources)} of the {len(wanted)} {kind} images of {ckpt} are not "
            f"in {root}: pass the folder they are in now as DATA_ROOT ({USAGE})"
        )
    print(f"before: {options_text(old.get('instances', {})) or 'not tuned'}")
    model = load_model(ckpt)
    samples = list(iter_samples(sources, f"Reading {kind} images"))
    tuner = TunePostprocessing(score=score, images=split)
    result = tuner.tune(model, samples, preprocessing(model))
    checkpoint["postprocess"] = result
    with atomic(Path(ckpt)) as tmp:
        torch.save(checkpoint, tmp)
    print(f"after ({score} {result[score]:.3f} on {len(samples)} {kind} images, defaults "
          f"{result[f'{score}_defaults']:.3f}): {options_text(result['instances'])}")
    return result


if __name__ == "__main__":
    if not 1 <= len(sys.argv) - 1 <= 3 or sys.argv[1] in ("-h", "--help"):
        raise SystemExit(f"{USAGE}\n{__doc__}")
    main(*sys.argv[1:])
