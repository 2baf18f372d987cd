"""Score a checkpoint at native resolution: ``python -m cellseg.eval ckpt_path=... data=...``.

Whatever geometry the model was trained in, predictions are made for whole images at their own
size (resize-mode models predict at their training scale and are resized back) and compared
with the original masks: pixel scores (iou, miou, dice) and instance scores (map, ap50, f1_50).
"""

from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from rich.console import Console
from rich.progress import track
from rich.table import Table

from cellseg import config_dir
from cellseg.datamodule import split_ids
from cellseg.datasets import Sample, read_samples
from cellseg.inference import load_model, preprocessing, segment
from cellseg.metrics import PIXEL_SCORES, confusion_counts, instance_scores
from cellseg.tune import instance_options

log = logging.getLogger(__name__)
SCORES = ("iou", "miou", "dice", "map", "ap50", "f1_50")


def select_samples(data: DictConfig, split: str) -> list[Sample]:
    """The images to score: the training run's test split, or ``all``."""
    samples = {s.id: s for s in read_samples(data.root, data.layout)}
    if split == "all":
        return [samples[i] for i in sorted(samples)]
    if split != "test":
        raise ValueError(f"split={split!r}; use test (the training split's test images) or all")
    _, test = split_ids(sorted(samples), data.test_size, data.split_seed)
    return [samples[i] for i in test]


def evaluate(cfg: DictConfig) -> tuple[dict[str, float], list[dict]]:
    """Scores over the selected images and one row of scores per image."""
    model = load_model(cfg.ckpt_path, cfg.device)
    pre = preprocessing(model, cfg.get("preprocess"))
    samples = select_samples(cfg.data, cfg.split)
    options = instance_options(cfg.instances, cfg.ckpt_path)
    counts, rows, start = torch.zeros(4, dtype=torch.long), [], time.perf_counter()
    for sample in track(samples, description="Evaluating", transient=True):
        foreground, labels = segment(model, sample.image, pre, cfg.inference, options)
        c = confusion_counts(
            torch.from_numpy(foreground > 0.5), torch.from_numpy(sample.labels > 0)
        )
        counts += c
        row = {
            "id": sample.id,
            "height": sample.labels.shape[0],
            "width": sample.labels.shape[1],
            "true_nuclei": int(sample.labels.max()),
            "pred_nuclei": int(labels.max()),
        }
        row.update({k: float(f(c)) for k, f in PIXEL_SCORES.items()})
        row.update(instance_scores(sample.labels, labels))
        rows.append(row)
    seconds = time.perf_counter() - start
    metrics = {k: float(f(counts)) for k, f in PIXEL_SCORES.items()}  # over all pixels
    metrics.update({k: float(np.mean([r[k] for r in rows])) for k in ("map", "ap50", "f1_50")})
    megapixels = sum(r["height"] * r["width"] for r in rows) / 1e6
    metrics.update(
        {"images": len(rows), "seconds": seconds, "megapixels_per_s": megapixels / seconds}
    )
    return metrics, rows


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
    for col in ("image", "nuclei", *SCORES):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            r["id"][:12], f"{r['true_nuclei']}/{r['pred_nuclei']}", *(f"{r[k]:.3f}" for k in SCORES)
        )
    table.add_row("all", "", *(f"{metrics[k]:.3f}" for k in SCORES), style="bold")
    Console().print(table)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="eval")
def main(cfg: DictConfig) -> dict[str, float]:
    metrics, rows = evaluate(cfg)
    out_dir = Path(cfg.paths.output_dir)
    write_outputs(out_dir, metrics, rows)
    print_table(metrics, rows, f"{cfg.ckpt_path} on {cfg.data.root} ({cfg.split})")
    log.info(
        "%d images, %.1f megapixels/s; metrics.json and per_image.csv in %s",
        metrics["images"],
        metrics["megapixels_per_s"],
        out_dir,
    )
    return metrics


if __name__ == "__main__":
    main()
