"""Segment new images: ``python -m cellseg.predict input=... output=DIR [model=...]``.

``model`` is a shipped model's name (the default: ``nuclei``), a ``.ckpt`` or a file that
``cellseg.export`` wrote (:mod:`cellseg.checkpoint`); the first log line says which runs.

``input`` is an image file, a flat folder of images or a dsb2018-layout folder
(``<id>/images/<id>.png``); TIFF and OME-TIFF files may hold channels (``channel=`` picks the
nuclei), Z planes and time points (segmented one 2-D plane at a time). For each image (id =
file stem) it writes:

- a 2-D image: ``masks/<id>.png`` (0/255), ``labels/<id>.png`` (16-bit instance labels) and
  ``overlays/<id>.png`` (nucleus outlines over the nuclei channel);
- a file with planes: ``labels/<id>.tif`` (16-bit, multi-page, the file's leading axes) and one
  ``overlays/<id>_z<k>.png`` (``_t<k>`` ...) per plane;
- ``tables/<id>.measurements.csv`` and ``tables/<id>.summary.csv``;
- an OME-Zarr input, or a plane above ``blocks.above``² pixels: ``labels/<id>.ome.zarr``
  (32-bit labels with a multiscale pyramid, segmented block-wise on dask: :mod:`cellseg.blocks`)
  and the tables.

``outputs=`` chooses among masks, overlays and tables (labels are always written). A folder's
images are segmented side by side, ``cluster.workers`` of them (auto: one per core, each with
one PyTorch thread), large ones block-wise after them.

From the per-image files it (re)builds ``submission.csv`` (Kaggle run-length format, 2-D images),
``measurements.csv`` (one row per nucleus) and ``summary.csv`` (one row per image and plane).
An image is done when its label file exists (written last), so an interrupted run completes
when run again; ``overwrite=true`` predicts everything anew. ``shard=i/n`` predicts the images
whose id hashes to ``i`` (separate processes or cluster jobs writing into one output folder);
the last shard to finish merges the tables, as does ``merge_only=true``. An unreadable file is
skipped with a warning and listed at the end; the run fails only when no image could be done.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import glob
import hashlib
import logging
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, ListConfig
from PIL import Image
from skimage.segmentation import find_boundaries

from cellseg import checkpoint, config_dir, threads
from cellseg.blocks import Engine, predict_large, worker_layout
from cellseg.checkpoint import instance_options
from cellseg.cli import one_line_errors, progress, run
from cellseg.datasets import IMAGE_SUFFIXES
from cellseg.errors import UserError
from cellseg.figures import display_rgb
from cellseg.files import (
    ZARR_SUFFIX,
    ImageFile,
    ImageFileError,
    atomic,
    open_image,
    plane_name,
    plane_suffix,
    save_png,
    save_stack,
    stem,
    write_rows,
)
from cellseg.inference import choose_scale, diameter_scale, segment_at_scale
from cellseg.measure import measure, summarize

log = logging.getLogger(__name__)
OUTPUTS = ("masks", "labels", "overlays", "tables")
TABLES = ("measurements", "summary")


def find_inputs(path: str | Path) -> dict[str, Path]:
    """Image id -> file for an image file, a flat folder or a dsb2018-layout folder."""
    path = Path(path).expanduser()
    if path.is_dir() and path.suffix.lower() == ZARR_SUFFIX:  # an OME-Zarr image
        return {stem(path): path}
    if path.is_file():
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise UserError(f"{path} is not an image ({', '.join(IMAGE_SUFFIXES)})")
        return {stem(path): path}
    if not path.is_dir():
        raise FileNotFoundError(f"input={path} does not exist; pass an image file or folder")
    nested = {d.name: d / "images" / f"{d.name}.png" for d in sorted(path.iterdir()) if d.is_dir()}
    found = {k: v for k, v in nested.items() if v.is_file()}
    # folders named like images too: skipped and named, not passed over in silence
    found = found or {stem(p): p for p in sorted(path.iterdir())
                      if p.suffix.lower() in (*IMAGE_SUFFIXES, ZARR_SUFFIX)
                      and not p.name.startswith(".")}
    if not found:
        raise FileNotFoundError(f"{path} holds no images (flat, *.ome.zarr, or "
                                "<id>/images/<id>.png)")
    return found


def check_output(output: Path, input_path: Path) -> None:
    """Refuse to write into the input folder (or below it)."""
    source = (input_path if input_path.is_dir() else input_path.parent).resolve()
    out = output.resolve()
    if out == source or source in out.parents:
        raise UserError(f"output={output} lies inside the input folder {source}; choose another")


def rle_by_label(labels: np.ndarray) -> dict[int, str]:
    """The Kaggle run-length encoding ('start length ...' over column-major pixels numbered from
    1) of every object of a label image, in one pass (not one per object: a 4096² image holds
    thousands of nuclei)."""
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
    """One mask from its run-length encoding (the inverse of :func:`rle_by_label`)."""
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


def write_submission(output: Path, ids: list[str]) -> int:
    """``submission.csv`` from the 2-D label files: one row per nucleus, or an empty row."""
    rows = 0
    with atomic(output / "submission.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ImageId", "EncodedPixels"])
        for image_id in ids:
            path = output / "labels" / f"{image_id}.png"
            if not path.is_file():
                continue  # a file with planes (labels/<id>.tif) or not done
            encoded = rle_by_label(np.asarray(Image.open(path)))
            for rle in encoded.values():
                writer.writerow([image_id, rle])
            if not encoded:
                writer.writerow([image_id, ""])
            rows += max(len(encoded), 1)
    return rows


def in_shard(image_id: str, shard: str | None) -> bool:
    """Whether ``shard`` ("i/n") takes this image: a hash of the id, not the listing order, so
    every process agrees whatever files it sees."""
    if not shard:
        return True
    try:
        i, n = (int(x) for x in str(shard).split("/"))
        if not 0 <= i < n:
            raise ValueError
    except ValueError:
        raise UserError(f"shard={shard}; use i/n with 0 <= i < n, e.g. shard=0/4") from None
    return int(hashlib.sha1(image_id.encode()).hexdigest(), 16) % n == i


def is_done(output: Path, image_id: str) -> bool:
    """An image is done when its label file (written last) exists."""
    labels = output / "labels"
    return ((labels / f"{image_id}.ome.zarr").is_dir()
            or any((labels / f"{image_id}.{ext}").is_file() for ext in ("png", "tif")))


def error_file(output: Path, image_id: str) -> Path:
    return output / "tables" / f"{image_id}.error.txt"


def remove_outputs(output: Path, image_id: str) -> None:
    """Delete what an earlier run wrote for an image (which now failed), so no table keeps it."""
    name = glob.escape(image_id)
    stale = [p for d in (*OUTPUTS, "tables") for p in (output / d).glob(f"{name}.*")]
    stale += (output / "overlays").glob(f"{name}_[tz][0-9]*.png")  # one overlay per plane
    for path in stale:
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def segment_plane(
    model, nuclei: np.ndarray, pre: dict, options: dict, cfg: DictConfig, path: Path,
    index: dict[str, int] | None = None, diameter: Any = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Foreground and labels of one plane (``index``: its place in a stack, named in the
    log) with ``diameter=`` (:func:`stack_diameter`); a constant plane holds no nuclei."""
    if min(nuclei.shape[:2]) < pre["multiple"]:
        raise ImageFileError(
            f"{path} is {nuclei.shape[0]}x{nuclei.shape[1]} pixels, smaller than the network's "
            f"size multiple {pre['multiple']}: too small to segment; remove it"
        )
    if nuclei.min() == nuclei.max():
        return np.zeros(nuclei.shape[:2], np.float32), np.zeros(nuclei.shape[:2], np.int32)
    return segment_at_scale(
        model, nuclei, pre, cfg.inference, options, diameter, name=plane_name(path, index)
    )


def stack_diameter(model, image: ImageFile, pre: dict, options: dict, cfg: DictConfig) -> Any:
    """The ``diameter=`` every plane of ``image`` is segmented with: as given, except that a
    stack's nuclei with ``diameter=auto`` are sized once, on its middle plane, and every plane
    segmented at that one scale (a stack's planes, Z or T, hold the same nuclei; sized plane by
    plane, planes of one field could be segmented at different scales)."""
    diameter = cfg.get("diameter")
    if diameter != "auto" or not image.stacked:
        return diameter
    indices = image.plane_indices()
    index = indices[len(indices) // 2]
    nuclei = image.nuclei(image.plane(index))
    if nuclei.min() == nuclei.max() or min(nuclei.shape[:2]) < pre["multiple"]:
        return diameter  # an empty plane: each sized on its own; too small: segment_plane says
    scale, _ = choose_scale(model, nuclei, pre, cfg.inference, options, "auto",
                            name=plane_name(image.path, index))
    log.info("%s: every plane segmented %s", image.path.name,
             f"rescaled by {scale:.3g}" if scale else "as it is")
    return pre["diameter"] / scale if scale else None


def is_large(image: ImageFile, above: int) -> bool:
    """Whether an image is segmented block-wise (:mod:`cellseg.blocks`): an OME-Zarr, or a
    plane of more than ``above``² pixels."""
    return image.path.suffix.lower() == ZARR_SUFFIX or image.height * image.width > above**2


def predict_file(model, image: ImageFile, image_id: str, pre: dict, options: dict,
                 cfg: DictConfig, output: Path) -> int:
    """Segment every plane of a file, write its outputs (``cfg.outputs``) and tables; returns
    its nuclei."""
    measurements, summaries = [], []
    nuclei_total = 0
    wanted = outputs_wanted(cfg)

    diameter = stack_diameter(model, image, pre, options, cfg)

    def results():
        nonlocal nuclei_total
        for index, plane in image.planes():
            nuclei = image.nuclei(plane)
            foreground, labels = segment_plane(model, nuclei, pre, options, cfg, image.path,
                                               index, diameter)
            if labels.max() >= 2**16:
                raise UserError(f"{image.path}: {labels.max()} nuclei do not fit 16-bit "
                                "label images; pass blocks.above=0 (labels as a 32-bit "
                                "OME-Zarr, docs/large-images.md)")
            keys = {"image": image_id, "t": index.get("T", 0), "z": index.get("Z", 0)}
            if "tables" in wanted:
                measurements.extend(measure(labels, plane, image.channel_names,
                                            image.pixel_size, foreground, **keys))
                summaries.append(summarize(labels, image.pixel_size, **keys))
            nuclei_total += int(labels.max())
            yield index, nuclei, foreground, labels.astype(np.uint16)

    if not image.stacked:
        ((_, nuclei, foreground, labels),) = list(results())
        if "masks" in wanted:
            save_png(output / "masks" / f"{image_id}.png",
                     ((foreground > 0.5) * 255).astype(np.uint8))
        if "overlays" in wanted:
            save_png(output / "overlays" / f"{image_id}.png", overlay(nuclei, labels))
        write_tables(output, image_id, measurements, summaries)
        save_png(output / "labels" / f"{image_id}.png", labels)  # last: "done"
        return nuclei_total

    def pages():
        for index, nuclei, _, labels in results():
            if "overlays" in wanted:
                save_png(output / "overlays" / f"{image_id}{plane_suffix(index)}.png",
                         overlay(nuclei, labels))
            yield labels

    sizes = dict(zip(image.axes, image.shape, strict=True))
    shape = (*image.planes_shape.values(), sizes["Y"], sizes["X"])
    axes = "".join(image.planes_shape) + "YX"
    with atomic(output / "labels" / f"{image_id}.tif") as tmp:  # renamed last: "done"
        save_stack(tmp, pages(), shape, axes, pixel_size=image.pixel_size)
        write_tables(output, image_id, measurements, summaries)
    return nuclei_total


def outputs_wanted(cfg: DictConfig) -> set[str]:
    """The outputs ``outputs=`` asks for (labels always: an image is done when they exist).
    A list, or one name as typed (``outputs=labels``, not read letter by letter)."""
    asked = cfg.get("outputs") or OUTPUTS
    if isinstance(asked, str):
        asked = [name.strip() for name in asked.split(",")]
    wanted = set(asked)
    unknown = wanted - set(OUTPUTS)
    if unknown:
        raise UserError(f"outputs={sorted(wanted)}: {', '.join(sorted(unknown))} is not one of "
                        f"{', '.join(OUTPUTS)}")
    return wanted | {"labels"}


def write_tables(output: Path, image_id: str, measurements: list, summaries: list) -> None:
    """An image's tables (none when ``outputs=`` leaves them out: no rows were measured)."""
    if summaries:
        write_rows(output / "tables" / f"{image_id}.measurements.csv", measurements)
        write_rows(output / "tables" / f"{image_id}.summary.csv", summaries)


def merge(output: Path, ids: list[str]) -> dict[str, int]:
    """``submission.csv``, ``measurements.csv`` and ``summary.csv`` from the per-image files,
    in image id order (the same bytes however many shards wrote them)."""
    result = {"submission_rows": write_submission(output, ids)}
    for name in TABLES:
        paths = [output / "tables" / f"{i}.{name}.csv" for i in ids]
        paths = [p for p in paths if p.is_file()]
        if not paths:  # outputs= without tables
            (output / f"{name}.csv").unlink(missing_ok=True)
            result[f"{name}_rows"] = 0
            continue
        fields = {}
        for path in paths:
            with open(path, newline="") as f:
                fields.update(dict.fromkeys(next(csv.reader(f), [])))
        rows = 0
        with atomic(output / f"{name}.csv") as tmp, open(tmp, "w", newline="") as out:
            writer = csv.DictWriter(out, fieldnames=list(fields), restval="")
            writer.writeheader()
            for path in paths:
                with open(path, newline="") as f:
                    for row in csv.DictReader(f):
                        writer.writerow(row)
                        rows += 1
        result[f"{name}_rows"] = rows
    return result


def segment_input(image_id: str, path: Path, engine: Engine | None, *, net, pre: dict,
                  options: dict, channel, cfg: DictConfig, output: Path,
                  pixel_size: tuple[float, float] | None = None) -> int | None:
    """Segment one input file and write its outputs; returns its nuclei. A large image
    (:func:`is_large`) goes block-wise on ``engine``; without one, None: left for later."""
    image = with_pixel_size(open_image(path, cfg.get("axes")).select(channel), pixel_size)
    large = is_large(image, cfg.blocks.above)
    if large and engine is None:
        return None
    log.info("%s: axes %s, shape %s (%s), %s", path.name, image.axes, image.shape,
             "axes=" if cfg.get("axes") else "from the file", pixel_text(image.pixel_size))
    if large:
        return predict_large(engine, image, image_id, net, pre, options, cfg, output)
    return predict_file(net, image, image_id, pre, options, cfg, output)


def pixel_text(size: tuple[float, float] | None) -> str:
    """The pixel size an image is measured with, for its log line."""
    if not size:
        return "no pixel size: areas in px only (pixel_size= gives it)"
    y, x = size
    return f"pixels of {y:g} µm" if np.isclose(y, x, rtol=1e-3) else f"pixels of {y:g} x {x:g} µm"


def given_pixel_size(value) -> tuple[float, float] | None:
    """``pixel_size=`` as (y, x) micrometres: one number for square pixels or [y, x]."""
    if value is None:
        return None
    values = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
    try:
        size = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        size = ()
    if len(size) == 1:
        size = size * 2
    if len(size) != 2 or not all(v > 0 for v in size):
        raise UserError(f"pixel_size={value}: give the pixel size in micrometres, one number "
                        "(e.g. pixel_size=0.325) or [y,x] (pixel_size=[0.325,0.325])")
    return size


def with_pixel_size(image: ImageFile, given: tuple[float, float] | None) -> ImageFile:
    """``image`` with the pixel size ``pixel_size=`` gives (areas in µm² for files that record
    none: PNG, JPEG, plain TIFF); where the file records another, the given one wins, logged."""
    if given is None:
        return image
    if image.pixel_size and not np.allclose(image.pixel_size, given, rtol=1e-3):
        log.warning("%s records pixels of %s µm; pixel_size= gives %s µm, which is used",
                    image.path.name, " x ".join(f"{v:g}" for v in image.pixel_size),
                    " x ".join(f"{v:g}" for v in given))
    return dataclasses.replace(image, pixel_size=given)


def attempt(work, image_id: str, path: Path, engine: Engine | None):
    """``work``'s result for one image, or the :class:`ImageFileError` that skips it."""
    try:
        return work(image_id, path, engine)
    except ImageFileError as err:  # unreadable or ambiguous: skipped, listed at the end
        return err


def image_workers(cfg: DictConfig):
    """``cluster.workers`` for whole images: 1 with ONNX Runtime, whose sessions run a thread
    pool over every core of their own."""
    return 1 if str(cfg.backend).startswith("onnxruntime") else cfg.cluster.get("workers")


def each_image(todo: dict[str, Path], work, engine: Engine, workers) -> Iterator[tuple]:
    """(id, nuclei or the :class:`ImageFileError` that skipped it) of every image to do, as
    they finish. Side by side on ``workers`` threads of this process (``cluster.workers``:
    auto, one per core), each with its share of PyTorch's threads: while one image is in the
    single-threaded post-processing and writing, another is in the network. Large images come
    after the others, one at a time, block-wise on ``engine``'s own workers."""
    count, per_worker = worker_layout(workers) if len(todo) > 1 else (1, None)
    if count == 1:
        for image_id, path in progress(todo.items(), "Predicting"):
            threads.refit()
            yield image_id, attempt(work, image_id, path, engine)
        return
    log.info("%d images side by side, %d PyTorch thread%s each (cluster.workers=%s)", count,
             per_worker, "s" * (per_worker > 1), workers)
    before, large = torch.get_num_threads(), []
    torch.set_num_threads(per_worker)
    pool = ThreadPoolExecutor(count, thread_name_prefix="predict")
    try:
        futures = {pool.submit(attempt, work, i, p, None): (i, p) for i, p in todo.items()}
        for future in progress(as_completed(futures), "Predicting", total=len(futures)):
            (image_id, path), result = futures[future], future.result()
            if result is None:
                large.append((image_id, path))
            else:
                yield image_id, result
    finally:
        pool.shutdown(cancel_futures=True)  # an error or Ctrl-C: the queued images not begun
        torch.set_num_threads(before)
    for image_id, path in large:
        yield image_id, attempt(work, image_id, path, engine)


@threads.sharing_cores
def predict(cfg: DictConfig) -> dict[str, float]:
    """Write the outputs for every input image (of this shard); returns a summary."""
    model_name = checkpoint.named(cfg)
    path, kind = checkpoint.resolve(model_name)
    log.info(checkpoint.model_line(model_name or checkpoint.DEFAULT_MODEL, kind, path,
                                   "" if model_name else "; model= names another"))
    inputs = find_inputs(cfg.input)
    output = Path(cfg.output).expanduser()
    check_output(output, Path(cfg.input).expanduser())
    ids = sorted(inputs)
    if cfg.get("merge_only"):
        missing = [i for i in ids if not is_done(output, i)]
        if missing:
            log.warning("%d of %d images are not done yet, e.g. %s", len(missing), len(ids),
                        missing[0])
        merged = merge(output, ids)
        log.info("merged the tables of %d images in %s", len(ids) - len(missing), output)
        return merged
    mine = {k: v for k, v in inputs.items() if in_shard(k, cfg.get("shard"))}
    todo = {k: v for k, v in mine.items() if cfg.overwrite or not is_done(output, k)}
    if len(todo) < len(mine):
        log.info(
            "%d of %d images already done in %s (overwrite=true redoes them)",
            len(mine) - len(todo),
            len(mine),
            output,
        )
    model = checkpoint.load(model_name, cfg.device) if todo else None
    pre = model.preprocessing(cfg.get("preprocess")) if todo else {}
    net = model.network(cfg.backend, cfg.device) if todo else None
    channel = cfg.get("channel")
    channel = pre.get("channel") if channel is None else channel
    if todo:
        log.info("network: %s backend on %s", getattr(net, "backend", "pytorch"), cfg.device)
        diameter_scale(pre, cfg.get("diameter"))  # checked (and logged) before any image
    if todo and channel is not None:
        log.info("nuclei channel: %s (%s)", channel,
                 "channel=" if cfg.get("channel") is not None else "as trained")
    options = instance_options(cfg.instances, {"postprocess": model.postprocess}) if todo else {}
    outputs_wanted(cfg)  # checked before any image and any folder
    pixel_size = given_pixel_size(cfg.get("pixel_size"))
    if pixel_size:
        log.info("pixel_size=%s µm: areas in µm² for every image", cfg.pixel_size)
    for d in OUTPUTS:
        (output / d).mkdir(parents=True, exist_ok=True)
    work = functools.partial(segment_input, net=net, pre=pre, options=options,
                             channel=channel, cfg=cfg, output=output, pixel_size=pixel_size)
    start, nuclei, failed = time.perf_counter(), 0, {}
    with Engine(cfg.cluster) as engine:  # dask starts at the first large image only
        for image_id, result in each_image(todo, work, engine, image_workers(cfg)):
            if isinstance(result, ImageFileError):  # skipped, listed at the end
                log.warning("skipped: %s", result)
                failed[image_id] = str(result)
                remove_outputs(output, image_id)
                error_file(output, image_id).write_text(f"{result}\n")
                continue
            nuclei += result
            error_file(output, image_id).unlink(missing_ok=True)
    seconds = time.perf_counter() - start
    failed = dict(sorted(failed.items()))  # in id order, however the images finished
    summary = {
        "images": len(todo) - len(failed),
        "skipped": len(mine) - len(todo),
        "failed": len(failed),
        "nuclei": nuclei,
        "seconds": seconds,
    }
    # the last shard to finish (every image done or failed) rebuilds the tables
    if all(is_done(output, i) or error_file(output, i).is_file() for i in ids):
        summary.update(merge(output, ids))
    images = summary["images"]
    log.info("%d image%s, %d nuclei, %.1f s (%d skipped as done); outputs in %s", images,
             "" if images == 1 else "s", nuclei, seconds, summary["skipped"], output)
    if failed:
        if not any(is_done(output, i) for i in mine):
            first = next(iter(failed.values()))
            if len(failed) > 1:
                first = f"none of the {len(failed)} images could be segmented; the first: {first}"
            raise ImageFileError(first)
        log.warning(
            "%d of %d images skipped: %s (why: tables/<id>.error.txt)",
            len(failed), len(todo), ", ".join(map(str, failed)),
        )
    return summary


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="predict")
@one_line_errors
def main(cfg: DictConfig) -> dict[str, float]:
    return predict(cfg)


if __name__ == "__main__":
    run(main, {"model": "model_name"})
