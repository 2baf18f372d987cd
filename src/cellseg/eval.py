"""Score a model at native resolution: ``python -m cellseg.eval model=...``.

By default the data the checkpoint was trained on (its root, layout and split ids are in the
checkpoint) and its test split; ``data_root=`` where that data has moved, ``data=NAME
data.root=DIR`` other data, ``split=train|val|test|all``. Whatever geometry the model was
trained in, predictions are made for whole images at their own size (resize-mode models predict
at their training scale and are resized back) and compared with the original masks: pixel
scores of the foreground probabilities (iou, miou, dice), the foreground IoU of the nuclei found
(iou_nuclei: the label image after post-processing, as other tools' label images are scored)
and instance scores (map, ap50, f1_50 per image, averaged; and ap50_pooled and map_pooled over
all nuclei of the set), through the same metric classes training logs.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from cellseg import checkpoint, config_dir, threads
from cellseg.checkpoint import instance_options
from cellseg.cli import one_line_errors, progress, run
from cellseg.datasets import Sample, Source, all_sources, iter_samples, make_splits
from cellseg.errors import UserError
from cellseg.inference import diameter_scale, segment_at_scale
from cellseg.metrics import InstanceScores, PixelScore, pixel_metrics

log = logging.getLogger(__name__)
SCORES = ("iou", "miou", "dice", "map", "ap50", "f1_50")
SPLITS = ("train", "val", "test", "all")


def scoring_command(model: str = "MODEL") -> str:
    """The command that scores ``model`` on annotated images of the user's: eval scores the
    checkpoint's own data unless given other data (eval.yaml: ``data: null``)."""
    return f"python -m cellseg.eval model={model} data=folder data.root=DIR split=all"


def scored_data(cfg: DictConfig, description: dict) -> tuple[str, str, str]:
    """Root and layout of the data to score, and where they come from (for the log)."""
    if cfg.get("data"):
        root, layout, origin = cfg.data.root, cfg.data.layout, "the data given (data=)"
    elif description["hparams"]:
        hp = description["hparams"]
        root, layout, origin = hp["root"], hp["layout"], "the checkpoint's training data"
    else:
        raise UserError(
            f"{checkpoint.named(cfg)} records no training data (an old checkpoint or an exported "
            f"file): pass the data to score, e.g. {scoring_command(checkpoint.named(cfg))}"
        )
    if cfg.get("data_root"):
        root, origin = cfg.data_root, f"{origin}, moved (data_root=)"
    return str(root), layout, origin


def select_ids(ids: list[str], split: str, description: dict, data: DictConfig | None) -> list[str]:
    """The ids of ``split`` (the checkpoint's own split ids), or every id for ``all``."""
    if split not in SPLITS:
        raise UserError(f"split={split!r}; use one of {', '.join(SPLITS)}")
    if split == "all":
        return sorted(ids)
    splits = description["splits"]
    if not splits:  # an old checkpoint: the split recomputed as training did
        if data is None:
            raise UserError("the checkpoint records no split: pass data=... or split=all")
        log.warning(
            "the checkpoint records no split ids: recomputing the %s split from data.test_size, "
            "data.val_size and data.split_seed, which must be the training run's", split
        )
        splits = make_splits(sorted(ids), data.test_size, data.val_size, data.split_seed)
    missing = sorted(set(splits[split]) - set(ids))
    if missing:
        raise UserError(
            f"{len(missing)} of the checkpoint's {len(splits[split])} {split} images are not in "
            f"the data (e.g. {missing[0]}); pass data_root=<where they are now> or split=all"
        )
    return list(splits[split])


def select_samples(sources: list[Source], ids: list[str], root: str) -> list[Sample]:
    """Decode only the samples with these ids, in this order."""
    by_id = {s.id: s for s in sources}
    return list(iter_samples([by_id[i] for i in ids], f"Reading {Path(root).name}"))


@threads.sharing_cores
def evaluate(
    cfg: DictConfig, on_image: Callable[[Sample, np.ndarray, np.ndarray], None] | None = None
) -> tuple[dict[str, float], list[dict]]:
    """Scores over the selected images and one row of scores per image; ``on_image(sample,
    foreground, labels)`` sees each segmentation (compare keeps some for its figure)."""
    model = checkpoint.load(checkpoint.named(cfg), cfg.device)
    log.info(model.first_line())
    pre = model.preprocessing(cfg.get("preprocess"))
    net = model.network(cfg.backend, cfg.device, cfg.get("data_root"))
    description = model.data
    root, layout, origin = scored_data(cfg, description)
    channel = pre["channel"] if cfg.get("channel") is None else cfg.channel
    # the checkpoint's own data: its train_roots too, where their images train and validate
    # (test images come from the root alone)
    own = not cfg.get("data") and cfg.split != "test"
    more = (description["hparams"].get("train_roots") or []) if own else []
    sources = list(all_sources(root, layout, channel, more).values())
    ids = select_ids([s.id for s in sources], cfg.split, description, cfg.get("data"))
    if not ids:
        raise UserError(
            f"the {cfg.split} split of {model.name} holds no images (a run that trained on every "
            f"image keeps none back, as experiment=finetune does): score annotated images it did "
            f"not train on, e.g. {scoring_command()}"
        )
    log.info("Scoring the %s split (%d images) of %s: %s", cfg.split, len(ids), root, origin)
    samples = select_samples(sources, ids, root)
    options = instance_options(cfg.instances, {"postprocess": model.postprocess})
    diameter_scale(pre, cfg.get("diameter"))  # checked (and logged) before any image
    pixel, instance = pixel_metrics(threshold=0.5), InstanceScores()
    # the foreground of the nuclei found (after post-processing): how other tools are scored
    nuclei_pixels = PixelScore("iou", threshold=0.5)
    rows, start = [], time.perf_counter()
    for sample in progress(samples, "Evaluating"):
        foreground, labels = segment_at_scale(
            net, sample.image, pre, cfg.inference, options, cfg.get("diameter"), name=sample.id
        )
        if on_image is not None:
            on_image(sample, foreground, labels)
        row = {
            "id": sample.id,
            "height": sample.labels.shape[0],
            "width": sample.labels.shape[1],
            "true_nuclei": int(sample.labels.max()),
            "pred_nuclei": int(labels.max()),
        }
        # calling a metric scores this image and adds it to the whole set's
        truth = torch.from_numpy(sample.labels > 0)
        row.update(pixel(torch.from_numpy(foreground), truth))
        row["iou_nuclei"] = nuclei_pixels(torch.from_numpy(labels > 0), truth)
        row.update(instance(sample.labels, labels))
        del row["ap50_pooled"], row["map_pooled"]  # of one image, its ap50 and map
        rows.append({k: v if isinstance(v, (str, int)) else float(v) for k, v in row.items()})
    seconds = time.perf_counter() - start
    scores = {**pixel.compute(), "iou_nuclei": nuclei_pixels.compute(), **instance.compute()}
    metrics = {k: float(v) for k, v in scores.items()}
    megapixels = sum(r["height"] * r["width"] for r in rows) / 1e6
    metrics.update(
        {"images": len(rows), "seconds": seconds, "megapixels_per_s": megapixels / seconds}
    )
    return metrics, rows


def evaluate_with(overrides: list[str]) -> tuple[dict[str, float], list[dict]]:
    """:func:`evaluate` of the eval config composed with command-line ``overrides`` (scripts
    that score several models: ``["model_name=nuclei", "split=val"]``)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return evaluate(compose("eval", overrides))


def write_outputs(out_dir: Path, metrics: dict[str, float], rows: list[dict]) -> None:
    """metrics.json, per_image.csv and TensorBoard scalars under ``out_dir``."""
    from torch.utils.tensorboard import SummaryWriter

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    with open(out_dir / "per_image.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with SummaryWriter(str(out_dir / "tensorboard")) as tb:
        for k in SCORES:
            tb.add_scalar(f"eval/{k}", metrics[k], 0)


def print_table(metrics: dict[str, float], rows: list[dict], title: str) -> None:
    table = Table(title=title)
    for col in ("image", "nuclei true/pred", *SCORES):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            r["id"][:12], f"{r['true_nuclei']}/{r['pred_nuclei']}", *(f"{r[k]:.3f}" for k in SCORES)
        )
    table.add_row("all", "", *(f"{metrics[k]:.3f}" for k in SCORES), style="bold")
    Console().print(table)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="eval")
@one_line_errors
def main(cfg: DictConfig) -> dict[str, float]:
    metrics, rows = evaluate(cfg)
    out_dir = Path(cfg.paths.output_dir)
    write_outputs(out_dir, metrics, rows)
    title = f"{checkpoint.named(cfg) or checkpoint.DEFAULT_MODEL}: {cfg.split} split"
    print_table(metrics, rows, f"{title}, {metrics['images']} images")
    log.info(
        "%d images, over all %d nuclei ap50_pooled %.3f and map_pooled %.3f, iou of the nuclei "
        "found %.3f, %.1f megapixels/s; metrics.json and per_image.csv in %s",
        metrics["images"],
        sum(r["true_nuclei"] for r in rows),
        metrics["ap50_pooled"],
        metrics["map_pooled"],
        metrics["iou_nuclei"],
        metrics["megapixels_per_s"],
        out_dir,
    )
    return metrics


if __name__ == "__main__":
    run(main, {"model": "model_name"}, {"data": scoring_command()})
