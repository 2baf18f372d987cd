"""Probability maps -> instance label images (0 = background, 1..N = nuclei, int32)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.measure import label as connected_components
from skimage.morphology import h_maxima
from skimage.segmentation import relabel_sequential, watershed


def remove_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Drop objects of fewer than ``min_size`` pixels and renumber 1..N."""
    sizes = np.bincount(labels.ravel())
    small = sizes < min_size
    small[0] = False
    labels = np.where(small[labels], 0, labels)
    return relabel_sequential(labels)[0].astype(np.int32)


def instances(
    foreground: np.ndarray,
    contours: np.ndarray | None = None,
    threshold: float = 0.5,
    min_size: int = 10,
    split: bool = True,
    h: float = 2.0,
) -> np.ndarray:
    """Label nuclei in a foreground probability map.

    Connected components of ``foreground > threshold``; touching nuclei are then split by a
    watershed, seeded by the regions away from predicted ``contours`` when given, else by the
    maxima of the distance transform deeper than ``h`` pixels. Objects below ``min_size``
    pixels are dropped.
    """
    mask = foreground > threshold
    if contours is not None:
        seeds = connected_components(mask & (contours <= threshold), connectivity=1)
        labels = watershed(contours, seeds, mask=mask)
    elif split and mask.any():
        distance = ndimage.distance_transform_edt(mask)
        seeds = connected_components(h_maxima(distance, h), connectivity=2)
        labels = watershed(-distance, seeds, mask=mask)
    else:
        labels = connected_components(mask, connectivity=1)
    # pixels of the mask that no seed reached (components without a seed) keep their component
    orphans = mask & (labels == 0)
    if orphans.any():
        extra = connected_components(orphans, connectivity=1)
        labels = np.where(orphans, extra + labels.max() * (extra > 0), labels)
    return remove_small(labels.astype(np.int32), min_size)
