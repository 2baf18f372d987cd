"""Per-nucleus measurements and per-image summaries (``skimage.measure.regionprops_table``)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from scipy import ndimage
from skimage.measure import regionprops_table

from cellseg.instances import object_scores


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
    (Y, X, C) as stored.

    Everything but the solidity is computed for all nuclei at once from pixel sums (moments,
    ``np.bincount``): ``regionprops``' definitions and values (the eccentricity of near-round
    nuclei within 1e-5), in half its time; the solidity needs each nucleus's convex hull
    (``regionprops``)."""
    if intensity.ndim == 2:
        intensity = intensity[..., None]
    labels = labels.astype(np.int32, copy=False)
    table = shape_table(labels)
    if not len(table["label"]):
        return []
    sums = pixel_sums(labels, intensity, table["label"])
    scores = None if foreground is None else object_scores(labels, foreground)
    um2 = pixel_size[0] * pixel_size[1] if pixel_size else None
    rows = []
    for i, label in enumerate(table["label"]):
        area = float(table["area"][i])
        row = {
            **keys,
            "label": int(label),
            "area_px": int(area),
            "area_um2": area * um2 if um2 else "",
            "centroid_y": float(table["centroid_y"][i]),
            "centroid_x": float(table["centroid_x"][i]),
            "bbox_y0": int(table["bbox"][i][0]),
            "bbox_x0": int(table["bbox"][i][1]),
            "bbox_y1": int(table["bbox"][i][2]),
            "bbox_x1": int(table["bbox"][i][3]),
            "equivalent_diameter_px": float(np.sqrt(4 * area / np.pi)),
            "eccentricity": float(table["eccentricity"][i]),
            "solidity": float(table["solidity"][i]),
        }
        if scores is not None:
            row["score"] = float(scores[row["label"]])
        for c, name in enumerate(channel_names):
            mean = float(sums["sum"][c][i] / area)
            row[f"mean_{name}"] = mean
            row[f"max_{name}"] = float(sums["max"][c][i])
            row[f"integrated_{name}"] = mean * area
        rows.append(row)
    return rows


def shape_table(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Label, area, centroid, bounding box, eccentricity (from the second central moments, as
    ``regionprops``) and solidity of every nucleus, in label order."""
    counts = np.bincount(labels.ravel())
    present = np.flatnonzero(counts[1:]) + 1
    if not len(present):
        return {"label": present}
    boxes = ndimage.find_objects(labels)
    bbox = np.array([[b[0].start, b[1].start, b[0].stop, b[1].stop]
                     for b in (boxes[k - 1] for k in present)])
    rows, cols = np.indices(labels.shape, dtype=np.float64)
    flat = labels.ravel()

    def total(weights):
        return np.bincount(flat, weights=weights.ravel(), minlength=len(counts))[present]

    area = counts[present].astype(np.float64)
    cy, cx = total(rows) / area, total(cols) / area
    # central second moments over the area: regionprops' inertia tensor [[mu_xx, -mu_xy], ...]
    syy = total(rows * rows) / area - cy * cy
    sxx = total(cols * cols) / area - cx * cx
    sxy = total(rows * cols) / area - cy * cx
    half_sum, root = (syy + sxx) / 2, np.sqrt(((syy - sxx) / 2) ** 2 + sxy**2)
    big, small = half_sum + root, np.maximum(half_sum - root, 0)
    eccentricity = np.where(big > 0, np.sqrt(1 - small / np.where(big > 0, big, 1)), 0.0)
    solidity = regionprops_table(labels, properties=("label", "solidity"))["solidity"]
    return {"label": present, "area": area, "centroid_y": cy, "centroid_x": cx, "bbox": bbox,
            "eccentricity": eccentricity, "solidity": solidity}


def pixel_sums(labels: np.ndarray, intensity: np.ndarray, present: np.ndarray) -> dict:
    """Per channel, the sum and the maximum of each nucleus's pixels (``present`` labels)."""
    flat = labels.ravel()
    sums, maxima = [], []
    for c in range(intensity.shape[-1]):
        channel = intensity[..., c]
        sums.append(np.bincount(flat, weights=channel.ravel().astype(np.float64),
                                minlength=int(present.max()) + 1)[present])
        maxima.append(ndimage.maximum(channel, labels, present))
    return {"sum": sums, "max": maxima}


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
