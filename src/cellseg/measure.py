"""Per-nucleus measurements and per-image summaries (``skimage.measure.regionprops_table``)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from skimage.measure import regionprops_table

from cellseg.instances import object_scores

SHAPE = (
    "label",
    "area",
    "centroid",
    "bbox",
    "equivalent_diameter_area",
    "eccentricity",
    "solidity",
)


def measure(
    labels: np.ndarray,
    intensity: np.ndarray,
    channel_names: Sequence[str],
    pixel_size: tuple[float, float] | None = None,
    foreground: np.ndarray | None = None,
    **keys,
) -> list[dict]:
    """One row per nucleus of a label image: ``keys`` (image id, plane), label, area in pixels
    (and µm² with a (y, x) pixel size in µm), centroid, bounding box (y0, x0, y1, x1 with the
    ends excluded), equivalent diameter (px), eccentricity, solidity, with the ``foreground``
    probabilities its score (their mean over the nucleus, what ``instances.min_score`` keeps
    nuclei by), and the mean, max and integrated intensity of every channel of ``intensity``
    (Y, X, C) as stored."""
    if intensity.ndim == 2:
        intensity = intensity[..., None]
    scores = None if foreground is None else object_scores(labels, foreground)
    table = regionprops_table(
        labels.astype(np.int32, copy=False),
        intensity,
        properties=(*SHAPE, "intensity_mean", "intensity_max"),
    )
    um2 = pixel_size[0] * pixel_size[1] if pixel_size else None
    rows = []
    for i in range(len(table["label"])):
        area = float(table["area"][i])
        row = {
            **keys,
            "label": int(table["label"][i]),
            "area_px": int(area),
            "area_um2": area * um2 if um2 else "",
            "centroid_y": float(table["centroid-0"][i]),
            "centroid_x": float(table["centroid-1"][i]),
            "bbox_y0": int(table["bbox-0"][i]),
            "bbox_x0": int(table["bbox-1"][i]),
            "bbox_y1": int(table["bbox-2"][i]),
            "bbox_x1": int(table["bbox-3"][i]),
            "equivalent_diameter_px": float(table["equivalent_diameter_area"][i]),
            "eccentricity": float(table["eccentricity"][i]),
            "solidity": float(table["solidity"][i]),
        }
        if scores is not None:
            row["score"] = float(scores[row["label"]])
        for c, name in enumerate(channel_names):
            mean = float(table[f"intensity_mean-{c}"][i])
            row[f"mean_{name}"] = mean
            row[f"max_{name}"] = float(table[f"intensity_max-{c}"][i])
            row[f"integrated_{name}"] = mean * area
        rows.append(row)
    return rows


def summarize(labels: np.ndarray, pixel_size: tuple[float, float] | None = None, **keys) -> dict:
    """One image or plane: nucleus count, mean and median area (px, and µm² with a pixel size),
    and the fraction of pixels inside nuclei."""
    areas = np.bincount(labels.ravel())[1:]
    return summarize_areas(areas[areas > 0], labels.size, pixel_size, **keys)


def summarize_areas(areas: np.ndarray, pixels: int, pixel_size: tuple[float, float] | None = None,
                    **keys) -> dict:
    """:func:`summarize` from the nuclei's areas (px) and the plane's pixel count."""
    um2 = pixel_size[0] * pixel_size[1] if pixel_size else None
    mean, median = (float(areas.mean()), float(np.median(areas))) if areas.size else (0.0, 0.0)
    return {
        **keys,
        "nuclei": int(areas.size),
        "mean_area_px": mean,
        "median_area_px": median,
        "mean_area_um2": mean * um2 if um2 else "",
        "median_area_um2": median * um2 if um2 else "",
        "area_fraction": float(areas.sum() / pixels) if pixels else 0.0,
    }


def median_diameter(label_images: Iterable[np.ndarray]) -> float | None:
    """The median equivalent diameter (px, the diameter of a disk of the same area) of every
    nucleus of the label images; None when there is none."""
    areas = [np.bincount(labels.ravel())[1:] for labels in label_images]
    areas = np.concatenate([a[a > 0] for a in areas]) if areas else np.array([])
    return float(np.median(np.sqrt(4 * areas / np.pi))) if areas.size else None
