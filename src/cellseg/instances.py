"""Probability maps -> instance label images (0 = background, 1..N = nuclei, int32).

The network's output channels are, in order: foreground, then (``out_channels`` >= 2) the
nuclei's inner contours, then (``out_channels`` >= 3) each nucleus's distance to its own border,
scaled to 1 at its centre, then (``out_channels`` = 5) each pixel's row and column offset from its
nucleus's centre (``cellseg.targets.centre_offsets``). :func:`labels_from_probs` turns such a
stack into nuclei.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.measure import label as connected_components
from skimage.morphology import h_maxima
from skimage.segmentation import expand_labels, relabel_sequential, watershed

THRESHOLD = 0.5  # foreground probability above which a pixel is in a nucleus, unless tuned


def remove_small(
    labels: np.ndarray,
    min_size: int,
    foreground: np.ndarray | None = None,
    min_score: float = 0.0,
) -> np.ndarray:
    """Drop objects of fewer than ``min_size`` pixels, and with ``foreground`` those whose score
    (their mean foreground probability) is below ``min_score``; renumber 1..N."""
    drop = np.bincount(labels.ravel()) < min_size
    if foreground is not None and min_score > 0:
        drop |= object_scores(labels, foreground) < min_score
    drop[0] = False
    labels = np.where(drop[labels], 0, labels)
    return relabel_sequential(labels)[0].astype(np.int32)


def object_scores(labels: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    """Each label's score, its mean foreground probability, indexed by label (0: background;
    labels absent from the image score 0)."""
    sums = np.bincount(labels.ravel(), weights=foreground.ravel().astype(np.float64))
    return sums / np.maximum(np.bincount(labels.ravel()), 1)


def instances(
    foreground: np.ndarray,
    contours: np.ndarray | None = None,
    threshold: float = THRESHOLD,
    min_size: int = 10,
    split: bool = True,
    h: float = 2.0,
    contour_threshold: float = 0.5,
    distance: np.ndarray | None = None,
    seed_threshold: float = 0.5,
    seed_h: float = 0.0,
    offsets: np.ndarray | None = None,
    offset_threshold: float = 1.0,
    min_score: float = 0.0,
) -> np.ndarray:
    """Label nuclei in a foreground probability map.

    Connected components of ``foreground > threshold``; touching nuclei are then split by a
    watershed, seeded by the cores where the predicted ``distance`` exceeds ``seed_threshold``
    when given (flooding down the distance), else by the regions away from predicted
    ``contours`` (at most ``contour_threshold``), else by the maxima of the distance transform
    deeper than ``h`` pixels. With ``seed_h`` > 0 a core is seeded once per maximum of the
    predicted distance at least ``seed_h`` deep (:func:`distance_seeds`), so touching nuclei
    whose cores merged are still split. With the predicted centre ``offsets`` (H, W, 2), cores
    are also cut where an offset falls faster than ``offset_threshold`` a pixel
    (:func:`offset_edges`): the border between two touching nuclei. Objects below ``min_size``
    pixels are dropped, and those whose score, their mean foreground probability, is below
    ``min_score`` (as StarDist keeps an object by its probability): the network's doubtful
    specks and fragments, whose pixels pass ``threshold`` only just.
    """
    mask = foreground > threshold
    if distance is not None:
        cores = mask & (distance > seed_threshold)
        if contours is not None:
            cores &= contours <= contour_threshold
        if offsets is not None and offset_threshold < 1:  # 1: off (no fall reaches it)
            cores &= offset_edges(offsets) <= offset_threshold
        if seed_h > 0:
            seeds = distance_seeds(cores, distance, seed_h)
        else:
            seeds = connected_components(cores, connectivity=1)
        labels = watershed(-distance, seeds, mask=mask)
    elif contours is not None:
        seeds = connected_components(mask & (contours <= contour_threshold), connectivity=1)
        labels = watershed(contours, seeds, mask=mask)
    elif split and mask.any():
        edt = ndimage.distance_transform_edt(mask)
        seeds = connected_components(h_maxima(edt, h), connectivity=2)
        labels = watershed(-edt, seeds, mask=mask)
    else:
        labels = connected_components(mask, connectivity=1)
    # pixels of the mask that no seed reached (components without a seed) keep their component
    orphans = mask & (labels == 0)
    if orphans.any():
        extra = connected_components(orphans, connectivity=1)
        labels = np.where(orphans, extra + labels.max() * (extra > 0), labels)
    return remove_small(labels.astype(np.int32), min_size, foreground, min_score)


def distance_seeds(cores: np.ndarray, distance: np.ndarray, h: float) -> np.ndarray:
    """Watershed seeds (labels) in each core: its maxima of the predicted distance (smoothed over
    1 px, against single-pixel noise) at least ``h`` deep, one seed each; never none. Numbered
    core by core (in the cores' raster order), each core's seeds in raster order.

    The distance is 1 at every nucleus's centre, falling towards its border, so two nuclei
    whose cores touch still show two peaks with a saddle between them (the h-maxima seeds of
    classical nucleus splitting, on the network's distance instead of the mask's). Each core is
    searched alone, in its bounding box (:func:`core_peaks`): fast on large images, and a
    core's top is always a maximum however flat it is. A core with a single pixel at least as
    high as its 8 neighbours, and no other core beside it, has one maximum, that pixel, which is
    its seed without a search (about 3 cores in 5 of the pool's images)."""
    if not cores.any():
        return np.zeros(cores.shape, np.int32)
    smooth = ndimage.gaussian_filter(distance.astype(np.float64), 1.0)
    core_labels = connected_components(cores, connectivity=1)
    n = int(core_labels.max())
    lifted = np.where(cores, smooth + 1.0, 0.0)
    top = cores & (lifted >= ndimage.maximum_filter(lifted, 3))
    search = np.bincount(core_labels[top], minlength=n + 1) != 1
    search[corner_neighbours(core_labels)] = True
    search |= h >= 1  # deeper than the lift of 1: a core's one top is no longer sure to be a seed
    search[0] = False
    seeds, count = np.where(top & ~search[core_labels], core_labels, 0), n
    boxes = ndimage.find_objects(core_labels)
    for i in np.flatnonzero(search):
        box = boxes[i - 1]
        found = connected_components(core_peaks(core_labels[box] == i, smooth[box], h),
                                     connectivity=2)
        seeds[box] = np.where(found > 0, found + count, seeds[box])
        count += int(found.max())
    # renumbered core by core, each core's seeds in raster order (their first pixels')
    at = np.flatnonzero(seeds)  # the seeds' pixels, in raster order
    ids, first = np.unique(seeds.ravel()[at], return_index=True)
    first = at[first]
    number = np.zeros(count + 1, np.int32)
    number[ids[np.lexsort((first, core_labels.ravel()[first]))]] = np.arange(1, len(ids) + 1)
    return number[seeds]


def core_peaks(inside: np.ndarray, smooth: np.ndarray, h: float) -> np.ndarray:
    """The pixels of one core (``inside``, a mask of its bounding box) that are maxima of
    ``smooth`` at least ``h`` deep. Lifted by 1 inside the core and 0 around it (a 1 px frame,
    so a core that fills its box is no plateau): the core's top is more than h deep."""
    lifted = np.pad(np.where(inside, smooth + 1.0, 0.0), 1)
    return inside & h_maxima(lifted, h)[1:-1, 1:-1].astype(bool)


def corner_neighbours(labels: np.ndarray) -> np.ndarray:
    """The labels that meet another label (not background) at a corner: of 4-connected
    components, the only way two can be 8-neighbours."""
    found = []
    for a, b in ((labels[:-1, :-1], labels[1:, 1:]), (labels[:-1, 1:], labels[1:, :-1])):
        meet = (a > 0) & (b > 0) & (a != b)
        found += [a[meet], b[meet]]
    return np.concatenate(found)


def offset_edges(offsets: np.ndarray) -> np.ndarray:
    """How fast the centre offsets (H, W, 2: row, column, in [0, 1]) fall, per pixel.

    Within a nucleus the row offset rises down the rows and the column offset along the columns
    (by 1 / the nucleus's extent a pixel); where two nuclei touch one of them falls from about
    1 to 0. The larger fall of the two (Sobel derivatives, so a pixel's neighbours smooth it),
    clipped at 0: 0 inside nuclei, about 0.5 on the border between touching ones."""
    offsets = offsets.astype(np.float32)
    fall_rows = -ndimage.sobel(offsets[..., 0], axis=0) / 8
    fall_cols = -ndimage.sobel(offsets[..., 1], axis=1) / 8
    return np.maximum(np.maximum(fall_rows, fall_cols), 0)


def labels_within(labels: np.ndarray, mask: np.ndarray, reach: int = 2) -> np.ndarray:
    """``labels`` cut to ``mask``, and grown into its pixels within ``reach`` px of a nucleus;
    renumbered 1..N (a nucleus wholly outside the mask is gone; mask pixels of no nucleus, such
    as those of objects the post-processing dropped, join one within reach or stay background)."""
    kept = np.where(mask, expand_labels(labels, reach), 0)
    return relabel_sequential(kept)[0].astype(np.int32)


def labels_from_probs(probs: np.ndarray, use_contours: bool = True, **options) -> np.ndarray:
    """Nuclei from an (H, W, K) probability stack, using every channel the network predicts.

    ``use_contours=False`` ignores the extra channels (a plain distance-transform watershed);
    ``options`` are :func:`instances`' keyword arguments, a ``None`` value meaning its default.
    """
    options = {k: v for k, v in options.items() if v is not None}
    k = probs.shape[-1] if use_contours else 1
    contours = probs[..., 1] if k >= 2 else None
    distance = probs[..., 2] if k >= 3 else None
    offsets = probs[..., 3:5] if k >= 5 else None
    return instances(probs[..., 0], contours, distance=distance, offsets=offsets, **options)
