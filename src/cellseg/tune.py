"""Post-processing tuned after training on images the network was not tested on, stored in the
checkpoint.

As StarDist tunes its thresholds after training and saves them with the model: when fitting
ends, :class:`TunePostprocessing` predicts the probability maps of the validation images once
(whole images at native resolution, as ``cellseg.eval`` does), searches the instance options
(``threshold``, ``contour_threshold``, ``seed_threshold``, ``seed_h``, ``offset_threshold``,
``h``, ``min_size``, ``min_score``: those the network's outputs use) for the best
``map_pooled`` by coordinate descent, and writes them into every checkpoint file of the run as
``checkpoint["postprocess"]``. Eval and predict read them with
:func:`cellseg.checkpoint.instance_options`; a value the user sets wins (and is logged).

``map_pooled`` is ``map`` over all the images' nuclei, each counting the same. A few validation
images hold from a score to hundreds of nuclei (``experiment=native``'s: 23, 23, 101, 183):
averaged over images (``score=map``, as before 2026-11-30), a 23-nucleus image steers the choice
as much as a 183-nucleus field (README, Results on the real data).

``images=train`` tunes on the training images instead of the validation ones, so that every
annotated image can train (``data.val_size=0``) and still tune (README, Results on the real
data: within the seeds' spread of holding 4 of 40 out; the recipes hold them out).
Tuning on the validation images is refused (logged, the defaults stay) when they are the test
images (``data.val_size=0``, the study's setting): options chosen on the test set would flatter it.
"""

from __future__ import annotations

import copy
import inspect
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from cellseg.checkpoint import describe_data, options_text, preprocessing, read
from cellseg.datasets import iter_samples
from cellseg.errors import UserError
from cellseg.inference import probabilities
from cellseg.instances import instances, labels_from_probs
from cellseg.metrics import InstanceScores

log = logging.getLogger(__name__)

# the values tried for each option; the search starts from instances()' defaults
SPACE = {
    "threshold": [0.3, 0.4, 0.5, 0.6, 0.7],
    "contour_threshold": [0.2, 0.3, 0.4, 0.5, 0.6, 0.7],
    "seed_threshold": [0.2, 0.3, 0.4, 0.5, 0.6, 0.7],
    "seed_h": [0.0, 0.05, 0.1, 0.2, 0.3],
    "h": [0.5, 1.0, 2.0, 3.0, 4.0],
    "min_size": [1, 5, 10, 20, 40],
    "offset_threshold": [0.02, 0.03, 0.05, 0.1, 1.0],
    "min_score": [0.0, 0.8, 0.85, 0.9],
}
DEFAULTS = {
    k: p.default for k, p in inspect.signature(instances).parameters.items() if k in SPACE
}


def searched_options(channels: int, use_contours: bool = True, split: bool = True) -> list[str]:
    """The instance options that act on a network with ``channels`` outputs."""
    k = channels if use_contours else 1
    extra = {1: ["h"] if split else [], 2: ["contour_threshold"]}
    three = ["contour_threshold", "seed_threshold", "seed_h"]
    five = [*three, "offset_threshold"]
    return ["threshold", *extra.get(k, three if k < 5 else five), "min_size", "min_score"]


SCORES = ("map_pooled", "map")  # what the search maximises (callbacks.tune_postprocess.score)


def set_score(
    probs: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    options: dict,
    score: str = "map_pooled",
) -> float:
    """The images' ``map`` (averaged over images) or ``map_pooled`` (over all their nuclei) of
    the nuclei found with ``options``."""
    scores = InstanceScores()
    for p, t in zip(probs, labels, strict=True):
        scores.update(t, labels_from_probs(p, **options))
    return float(scores.compute()[score])


def search(
    probs: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    space: Mapping[str, Sequence],
    start: dict[str, Any],
    rounds: int = 3,
    score: str = "map_pooled",
) -> tuple[dict[str, Any], float]:
    """Coordinate descent: each option in turn set to its best value in ``space`` (the others
    fixed), until a round changes nothing; returns the options (``start`` updated) and their
    ``score`` (:func:`set_score`). A tie keeps the current value, so the defaults stay unless
    beaten."""
    best = dict(start)
    value = set_score(probs, labels, best, score)
    for _ in range(rounds):
        changed = False
        for name, values in space.items():
            for candidate in values:
                if candidate == best[name]:
                    continue
                trial = set_score(probs, labels, {**best, name: candidate}, score)
                if trial > value:
                    best, value, changed = {**best, name: candidate}, trial, True
        if not changed:
            break
    return best, value


class TunePostprocessing(L.Callback):
    """After fitting, tune the instance options on the validation split (``images="val"``) or the
    training split (``images="train"``) and store them in every checkpoint file the run's
    ModelCheckpoint callbacks kept (best, last)."""

    def __init__(
        self,
        enabled: bool = True,
        use_contours: bool = True,
        split: bool = True,
        rounds: int = 3,
        inference: dict | None = None,
        images: str = "val",
        score: str = "map_pooled",
    ) -> None:
        if images not in ("val", "train"):
            raise UserError(
                f"callbacks.tune_postprocess.images={images!r}; use val (the held-out "
                "validation images) or train (the training images)"
            )
        if score not in SCORES:
            raise UserError(
                f"callbacks.tune_postprocess.score={score!r}; use map_pooled (map over all the "
                "images' nuclei) or map (map averaged over the images)"
            )
        self.enabled, self.rounds, self.images, self.score = enabled, rounds, images, score
        self.use_contours, self.split = use_contours, split
        self.inference = inference or {}

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.enabled and not trainer.interrupted and trainer.is_global_zero:
            reason = self.refusal(trainer)
            if reason:
                log.warning("Post-processing not tuned: %s; the defaults stay", reason)
            else:
                self.tune_checkpoints(trainer, pl_module)
        trainer.strategy.barrier()

    def refusal(self, trainer: L.Trainer) -> str | None:
        """Why the options cannot be tuned on this run, or None."""
        splits = getattr(trainer.datamodule, "splits", None) or {}
        if not splits.get(self.images):
            return f"the datamodule has no {self.images} split"
        if self.images == "val" and sorted(splits["val"]) == sorted(splits.get("test", [])):
            return (
                "the validation images are the test images (data.val_size=0); set "
                "data.val_size=0.1 to hold validation images out of training, or "
                "callbacks.tune_postprocess.images=train to tune on the training images"
            )
        if not checkpoint_paths(trainer):
            return "the run kept no checkpoint"
        return None

    def tune_checkpoints(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Search the options for each checkpoint's weights and write them into its file."""
        dm = trainer.datamodule
        ids = set(dm.splits[self.images])
        sources = [s for i, s in dm.sources().items() if i in ids]
        kind = {"val": "validation", "train": "training"}[self.images]
        samples = list(iter_samples(sources, f"Reading {kind} images"))
        weights, was_training = copy.deepcopy(pl_module.state_dict()), pl_module.training
        pl_module.eval()
        results: dict[tuple[int, int], dict] = {}  # by (epoch, step): best and last may agree
        try:
            for path in checkpoint_paths(trainer):
                checkpoint = read(path)
                key = (checkpoint.get("epoch"), checkpoint.get("global_step"))
                if key not in results:
                    start = time.perf_counter()
                    pl_module.load_state_dict(checkpoint["state_dict"])
                    pre = preprocessing(pl_module, data=describe_data(checkpoint))
                    results[key] = self.tune(pl_module, samples, pre)
                    r = results[key]
                    log.info(
                        "Post-processing tuned on %d %s images for %s in %.1f s: "
                        "%s %.3f (defaults %.3f) with %s", len(samples), kind, path.name,
                        time.perf_counter() - start, self.score, r[self.score],
                        r[f"{self.score}_defaults"], options_text(r["instances"]),
                    )
                checkpoint["postprocess"] = results[key]
                trainer.strategy.checkpoint_io.save_checkpoint(checkpoint, path)
        finally:
            pl_module.load_state_dict(weights)
            pl_module.train(was_training)

    def tune(self, model: L.LightningModule, samples: list, pre: dict) -> dict[str, Any]:
        """The ``postprocess`` entry of a checkpoint: tuned options and their scores."""
        options = searched_options(model.net.head.out_channels, self.use_contours, self.split)
        start = {k: DEFAULTS[k] for k in options}
        fixed = {"use_contours": self.use_contours, "split": self.split}
        with torch.no_grad():
            probs = [probabilities(model, s.image, pre, {"device": model.device, **self.inference})
                     for s in samples]
        truth = [s.labels for s in samples]
        space = {k: SPACE[k] for k in options}
        best, value = search(probs, truth, space, {**fixed, **start}, self.rounds, self.score)
        return {
            "instances": {k: best[k] for k in (*fixed, *options)},
            "split": self.images,  # the images tuned on: val or train
            "images": len(samples),
            "score": self.score,  # what the search maximised
            self.score: value,
            f"{self.score}_defaults": set_score(probs, truth, {**fixed, **start}, self.score),
        }


def checkpoint_paths(trainer: L.Trainer) -> list[Path]:
    """The checkpoint files the run's ModelCheckpoint callbacks kept (best and last)."""
    paths = []
    for cb in trainer.checkpoint_callbacks:
        for p in (cb.best_model_path, cb.last_model_path):
            if p and Path(p).is_file() and Path(p).resolve() not in paths:
                paths.append(Path(p).resolve())
    return paths
