"""napari reader: microscopy files through :mod:`cellseg.files` and ``predict`` output folders.

A TIFF / OME-TIFF opens as one image layer per channel, named after the channel, scaled by the
pixel size in µm (planes, Z or T, as the layer's leading axes); PNG and JPEG images as one
layer; an OME-Zarr (``*.zarr``) as a multiscale layer read lazily, a labels layer where it is a
labels image (what ``predict`` writes for large images). A folder that
``python -m cellseg.predict`` wrote opens as, for each image, its overlay and its labels, with
the per-nucleus measurements as the labels layer's features.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from cellseg.files import ZARR_SUFFIX, ImageFile, open_image, plane_suffix, stem

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
LayerData = tuple[Any, dict[str, Any], str]


def get_reader(path: str | list[str]):
    """The reader function for ``path``, or None when cellseg does not read it."""
    if isinstance(path, list):
        return None
    p = Path(path)
    if p.is_dir() and p.suffix.lower() == ZARR_SUFFIX:
        return read_zarr_layers
    if p.is_dir() and (p / "labels").is_dir():
        return read_predict_output
    if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
        return read_image_layers
    return None


def plane_stack(image: ImageFile) -> np.ndarray:
    """Every plane of a file as (*planes, Y, X, C)."""
    planes = [image.plane(index) for index in image.plane_indices()]
    stacked = np.stack(planes)
    return stacked.reshape(*image.planes_shape.values(), *planes[0].shape)


def read_image_layers(path: str) -> list[LayerData]:
    """One image layer per channel (or one colour layer), named and scaled as the file says."""
    image = open_image(path)
    data = plane_stack(image)
    scale = [1.0] * len(image.planes_shape) + list(image.pixel_size or (1.0, 1.0))
    meta = {"path": str(path), "pixel_size": image.pixel_size,
            "channel_names": image.channel_names}
    name = stem(Path(path))
    units = ("pixel",) * len(image.planes_shape) + (("µm",) * 2 if image.pixel_size else
                                                    ("pixel",) * 2)
    common = {"scale": scale, "metadata": meta, "units": units}
    if image.rgb or data.shape[-1] == 1:
        rgb = image.rgb and data.shape[-1] >= 3
        layer = data[..., :3] if rgb else data[..., 0]
        return [(layer, {**common, "name": name, "rgb": rgb}, "image")]
    return [
        (data[..., c], {**common, "name": f"{name} {channel}", "blending": "additive",
                        "metadata": {**meta, "channel": c}}, "image")
        for c, channel in enumerate(image.channel_names)
    ]


def read_zarr_layers(path: str) -> list[LayerData]:
    """An OME-Zarr as one multiscale layer (every resolution level, read lazily as napari
    shows it): labels for a labels image, else an image layer per channel."""
    import dask.array as da
    import zarr

    group = zarr.open_group(path, mode="r")
    attrs = dict(group.attrs)
    meta = attrs.get("ome", attrs)
    scales = meta["multiscales"][0]
    axes = "".join(a["name"] if isinstance(a, dict) else a for a in scales["axes"]).upper()
    levels = [da.from_zarr(group[d["path"]]) for d in scales["datasets"]]
    transform = scales["datasets"][0].get("coordinateTransformations", [{}])[0]
    scale = list(transform.get("scale", [1.0] * len(axes)))
    name = stem(Path(path))
    if "image-label" in meta:
        return [(levels, {"name": f"{name} labels", "multiscale": True, "scale": scale},
                 "labels")]
    if "C" not in axes:
        return [(levels, {"name": name, "multiscale": True, "scale": scale}, "image")]
    c = axes.index("C")
    names = [ch.get("label") or f"c{i}" for i, ch in
             enumerate(meta.get("omero", {}).get("channels", []))]
    names = names if len(names) == levels[0].shape[c] else [f"c{i}" for i in range(
        levels[0].shape[c])]
    keep = scale[:c] + scale[c + 1 :]
    return [([level.take(i, axis=c) for level in levels],
             {"name": f"{name} {channel}", "multiscale": True, "scale": keep,
              "blending": "additive"}, "image") for i, channel in enumerate(names)]


def read_table(path: Path) -> dict[str, list]:
    """A CSV file's columns (numbers as numbers)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    columns: dict[str, list] = {k: [] for k in (rows[0] if rows else {})}
    for row in rows:
        for k, v in row.items():
            try:
                columns[k].append(float(v))
            except ValueError:
                columns[k].append(v)
    return columns


def read_predict_output(path: str) -> list[LayerData]:
    """Each image's overlay and labels (measurements as features) of a predict output folder,
    scaled by the pixel size its summary table records, as the image's own layers are."""
    folder, layers = Path(path), []
    for labels_path in sorted((folder / "labels").iterdir()):
        if labels_path.suffix.lower() == ZARR_SUFFIX:  # a large image: a pyramid, no features
            layers += read_zarr_layers(str(labels_path))
            continue
        if labels_path.suffix.lower() not in (".png", ".tif", ".tiff"):
            continue
        name, image = stem(labels_path), open_image(labels_path)
        tables = folder / "tables"
        placed = placement(image.planes_shape, tables / f"{name}.summary.csv")
        overlays = [folder / "overlays" / f"{name}{plane_suffix(i)}.png"
                    for i in image.plane_indices()]
        if all(p.is_file() for p in overlays):  # one per plane of a stack
            overlay = np.stack([open_image(p).plane() for p in overlays])
            overlay = overlay.reshape(*image.planes_shape.values(), *overlay.shape[1:])
            layers.append((overlay, {**placed, "name": f"{name} overlay", "rgb": True},
                           "image"))
        labels = plane_stack(image)[..., 0].astype(np.int32)
        table = tables / f"{name}.measurements.csv"
        features = read_table(table) if table.is_file() else {}
        layers.append((labels, {**placed, "name": f"{name} labels",
                                "features": features or None}, "labels"))
    return layers


def placement(planes_shape: dict[str, int], summary: Path) -> dict[str, Any]:
    """A predict output's layer scale and units: µm where the image's summary table records
    the pixel size it was measured with, else pixels."""
    rows = read_table(summary) if summary.is_file() else {}
    size = [rows.get(k, [""])[0] for k in ("pixel_height_um", "pixel_width_um")]
    known = all(isinstance(v, float) for v in size)
    planes = len(planes_shape)
    return {"scale": [1.0] * planes + (size if known else [1.0, 1.0]),
            "units": ("pixel",) * planes + (("µm",) * 2 if known else ("pixel",) * 2)}
