"""What the napari widget does, without Qt: segment an image as ``cellseg.predict`` does, add
corrected labels to a training set, save results, and the fine-tuning command."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from cellseg import checkpoint, config_dir
from cellseg.checkpoint import instance_options
from cellseg.datasets import image_files
from cellseg.errors import UserError
from cellseg.files import save_png
from cellseg.inference import segment_at_scale
from cellseg.measure import measure, summarize


def defaults(group: str) -> dict[str, Any]:
    """A config group's default values as predict composes them (inference, instances)."""
    return dict(OmegaConf.to_container(OmegaConf.load(Path(config_dir()) / group / "default.yaml")))


@dataclass
class Result:
    """One segmentation: labels, foreground probabilities and one measurement row per nucleus."""

    labels: np.ndarray
    foreground: np.ndarray
    measurements: list[dict]
    summary: dict


def as_planes(data: np.ndarray, rgb: bool) -> np.ndarray:
    """A napari image layer's 2-D data as (Y, X, C): grey (Y, X) or colour (Y, X, 3|4)."""
    data = np.asarray(data)
    if rgb:
        return data[..., :3] if data.shape[-1] == 4 else data
    if data.ndim != 2:
        raise UserError(
            f"the image layer has shape {data.shape}; the widget segments one 2-D plane: "
            "choose a 2-D layer (the reader opens each channel as its own layer)"
        )
    return data[..., None]


def segment(
    model: checkpoint.Model, image: np.ndarray, diameter: Any = "auto", tta: bool = False,
    name: str = "image", pixel_size: tuple[float, float] | None = None,
    channel_names: list[str] | None = None,
) -> Result:
    """Segment a (Y, X, C) image with ``model``: what ``python -m cellseg.predict`` computes for
    the same image, model, ``diameter`` and ``inference.tta``."""
    pre = model.preprocessing()
    inference = {**defaults("inference"), "tta": tta}
    options = instance_options(defaults("instances"), {"postprocess": model.postprocess})
    if image.min() == image.max():  # a constant plane holds no nuclei (as predict says)
        foreground = np.zeros(image.shape[:2], np.float32)
        labels = np.zeros(image.shape[:2], np.int32)
    else:
        foreground, labels = segment_at_scale(
            model.net, image, pre, inference, options, diameter, name=name
        )
    names = channel_names or [f"c{i}" for i in range(image.shape[-1])]
    rows = measure(labels, image, names, pixel_size, foreground, image=name, t=0, z=0)
    return Result(labels.astype(np.int32), foreground, rows,
                  summarize(labels, pixel_size, image=name, t=0, z=0))


def add_to_training_set(folder: str | Path, name: str, image: np.ndarray,
                        labels: np.ndarray) -> Path:
    """Save ``image`` and its (corrected) ``labels`` into ``folder`` in the ``data=folder``
    layout (images/<name>.tif, masks/<name>.png); returns the mask's path."""
    import tifffile

    folder = Path(folder).expanduser()
    if labels.shape != image.shape[:2]:
        raise UserError(f"labels of shape {labels.shape} do not match the image's "
                        f"{image.shape[:2]}; add the image its labels were made for")
    if labels.max() >= 2**16:
        raise UserError(f"{labels.max()} nuclei do not fit a 16-bit mask")
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(exist_ok=True)
    stored = image[..., 0] if image.shape[-1] == 1 else image
    tifffile.imwrite(folder / "images" / f"{name}.tif", stored)
    mask = folder / "masks" / f"{name}.png"
    save_png(mask, labels.astype(np.uint16))
    return mask


def save(folder: str | Path, name: str, image: np.ndarray, labels: np.ndarray,
         foreground: np.ndarray, pixel_size: tuple[float, float] | None = None,
         channel_names: list[str] | None = None) -> list[Path]:
    """Write the labels TIFF and the measurements CSV as ``predict`` names them
    (``labels/<name>.tif``, ``tables/<name>.measurements.csv``), the labels measured as they
    are now (corrected or not)."""
    import tifffile

    from cellseg.predict import write_tables

    folder = Path(folder).expanduser()
    for sub in ("labels", "tables"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    path = folder / "labels" / f"{name}.tif"
    tifffile.imwrite(path, labels.astype(np.uint16))
    names = channel_names or [f"c{i}" for i in range(image.shape[-1])]
    keys = {"image": name, "t": 0, "z": 0}
    rows = measure(labels, image, names, pixel_size, foreground, **keys)
    write_tables(folder, name, rows, [summarize(labels, pixel_size, **keys)])
    return [path, folder / "tables" / f"{name}.measurements.csv"]


def finetune_dir(folder: str | Path) -> Path:
    """A new run folder for fine-tuning on the training set ``folder``, kept with it (not in a
    temporary folder that a reboot empties): ``folder/models/finetune_<time>``."""
    folder = Path(folder).expanduser()
    if not (folder / "masks").is_dir() or not image_files(folder / "masks"):
        raise UserError(f"{folder}: no annotated images in masks/ to fine-tune on; add corrected "
                        "labels first (Add to training set)")
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    run_dir, k = folder / "models" / f"finetune_{stamp}", 1
    while run_dir.exists():
        run_dir, k = run_dir.with_name(f"finetune_{stamp}_{k}"), k + 1
    run_dir.mkdir(parents=True)
    return run_dir


def finetune_command(folder: str | Path, model: str | Path, run_dir: str | Path,
                     epochs: int = 20) -> list[str]:
    """The fine-tuning run the widget starts: ``experiment=finetune`` on ``folder`` from
    ``model``, into ``run_dir`` (its model: ``run_dir/checkpoints/last.ckpt``)."""
    return [sys.executable, "-m", "cellseg.train", "experiment=finetune",
            f"data.root={Path(folder).expanduser()}", f"pretrained={model}",
            f"trainer.max_epochs={epochs}", f"hydra.run.dir={run_dir}"]
