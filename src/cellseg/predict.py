"""Segment new images: ``python -m cellseg.predict ckpt_path=... input=... output=DIR``.

``input`` is an image file, a flat folder of images or a dsb2018-layout folder
(``<id>/images/<id>.png``). For each image (id = file stem) it writes ``DIR/masks/<id>.png``
(0/255), ``DIR/labels/<id>.png`` (16-bit instance labels), ``DIR/overlays/<id>.png`` (nucleus
outlines over the image) and, from all label files, ``DIR/submission.csv`` in the Kaggle format.
Images whose three files exist are skipped, so an interrupted run completes when run again;
``overwrite=true`` predicts everything anew.
"""

from __future__ import annotations

import csv
import logging
import time
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig
from PIL import Image
from rich.progress import track
from skimage.segmentation import find_boundaries

from cellseg import config_dir
from cellseg.datasets import IMAGE_SUFFIXES, image_files, read_image
from cellseg.figures import display_rgb
from cellseg.inference import load_model, preprocessing, segment
from cellseg.tune import instance_options

log = logging.getLogger(__name__)
OUTPUTS = ("masks", "labels", "overlays")


def find_inputs(path: str | Path) -> dict[str, Path]:
    """Image id -> file for an image file, a flat folder or a dsb2018-layout folder."""
    path = Path(path).expanduser()
    if path.is_file():
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise ValueError(f"{path} is not an image ({', '.join(IMAGE_SUFFIXES)})")
        return {path.stem: path}
    if not path.is_dir():
        raise FileNotFoundError(f"input={path} does not exist; pass an image file or folder")
    nested = {d.name: d / "images" / f"{d.name}.png" for d in sorted(path.iterdir()) if d.is_dir()}
    found = {k: v for k, v in nested.items() if v.is_file()}
    found = found or {p.stem: p for p in image_files(path)}
    if not found:
        raise FileNotFoundError(f"{path} holds no images (flat, or <id>/images/<id>.png)")
    return found


def check_output(output: Path, input_path: Path) -> None:
    """Refuse to write into the input folder (or below it)."""
    source = (input_path if input_path.is_dir() else input_path.parent).resolve()
    out = output.resolve()
    if out == source or source in out.parents:
        raise ValueError(f"output={output} lies inside the input folder {source}; choose another")


def rle_encode(mask: np.ndarray) -> str:
    """Kaggle run-length encoding: 'start length ...' over column-major pixels numbered from 1."""
    return rle_by_label(np.asarray(mask, bool).astype(np.uint8)).get(1, "")


def rle_by_label(labels: np.ndarray) -> dict[int, str]:
    """The Kaggle run-length encoding of every object of a label image, in one pass (not one
    per object: a 4096² image holds thousands of nuclei)."""
    flat = labels.T.ravel()
    where = np.flatnonzero(flat)
    order = np.argsort(flat[where], kind="stable")  # column-major order kept within a label
    where, ids = where[order], flat[where][order]
    if not len(ids):
        return {}
    bounds = np.flatnonzero(np.diff(ids)) + 1
    encoded = {}
    for k, pixels in zip(ids[np.r_[0, bounds]], np.split(where, bounds), strict=True):
        breaks = np.flatnonzero(np.diff(pixels) != 1) + 1
        starts = pixels[np.r_[0, breaks]] + 1
        lengths = np.diff(np.r_[0, breaks, len(pixels)])
        encoded[int(k)] = " ".join(f"{a} {b}" for a, b in zip(starts, lengths, strict=True))
    return encoded


def rle_decode(rle: str, shape: tuple[int, int]) -> np.ndarray:
    """The inverse of :func:`rle_encode`."""
    flat = np.zeros(shape[0] * shape[1], bool)
    numbers = np.array(rle.split(), int)
    for start, length in zip(numbers[::2], numbers[1::2], strict=True):
        flat[start - 1 : start - 1 + length] = True
    return flat.reshape(shape[1], shape[0]).T


def overlay(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The image as 8-bit RGB with nucleus outlines in yellow."""
    rgb = display_rgb(image)
    rgb[find_boundaries(labels, mode="inner")] = (255, 255, 0)
    return rgb


def write_submission(output: Path) -> int:
    """``submission.csv`` from every label file: one row per nucleus, or an empty row."""
    rows = 0
    with open(output / "submission.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ImageId", "EncodedPixels"])
        for path in sorted((output / "labels").glob("*.png")):
            encoded = rle_by_label(np.asarray(Image.open(path)))
            for rle in encoded.values():
                writer.writerow([path.stem, rle])
            if not encoded:
                writer.writerow([path.stem, ""])
            rows += max(len(encoded), 1)
    return rows


def predict(cfg: DictConfig) -> dict[str, float]:
    """Write the outputs for every input image; returns a summary."""
    inputs = find_inputs(cfg.input)
    output = Path(cfg.output).expanduser()
    check_output(output, Path(cfg.input).expanduser())
    todo = {
        k: v
        for k, v in inputs.items()
        if cfg.overwrite or not all((output / d / f"{k}.png").is_file() for d in OUTPUTS)
    }
    if len(todo) < len(inputs):
        log.info(
            "%d of %d images already done in %s (overwrite=true redoes them)",
            len(inputs) - len(todo),
            len(inputs),
            output,
        )
    model = load_model(cfg.ckpt_path, cfg.device) if todo else None
    pre = preprocessing(model, cfg.get("preprocess")) if todo else {}
    options = instance_options(cfg.instances, cfg.ckpt_path) if todo else {}
    for d in OUTPUTS:
        (output / d).mkdir(parents=True, exist_ok=True)
    start, nuclei = time.perf_counter(), 0
    for image_id, path in track(todo.items(), description="Predicting"):
        image = read_image(path)
        foreground, labels = segment(model, image, pre, cfg.inference, options)
        if labels.max() >= 2**16:
            raise ValueError(f"{path}: {labels.max()} nuclei do not fit a 16-bit label image")
        save_png(output / "masks" / f"{image_id}.png", ((foreground > 0.5) * 255).astype(np.uint8))
        save_png(output / "overlays" / f"{image_id}.png", overlay(image, labels))
        save_png(output / "labels" / f"{image_id}.png", labels.astype(np.uint16))  # last: "done"
        nuclei += int(labels.max())
    rows = write_submission(output)
    seconds = time.perf_counter() - start
    summary = {
        "images": len(todo),
        "skipped": len(inputs) - len(todo),
        "nuclei": nuclei,
        "seconds": seconds,
        "submission_rows": rows,
    }
    log.info(
        "%d images, %d nuclei, %.1f s (%d skipped); outputs in %s",
        len(todo),
        nuclei,
        seconds,
        summary["skipped"],
        output,
    )
    return summary


def save_png(path: Path, array: np.ndarray) -> None:
    """Write a PNG atomically: a half-written file never takes the final name."""
    tmp = path.with_name(f".{path.name}.partial")
    Image.fromarray(array).save(tmp, format="PNG")
    tmp.replace(path)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="predict")
def main(cfg: DictConfig) -> dict[str, float]:
    return predict(cfg)


if __name__ == "__main__":
    main()
