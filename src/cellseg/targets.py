"""Training targets drawn from instance labels: what the network learns to predict.

One channel per output (``TARGET_NAMES``): foreground; contours between touching nuclei; each
nucleus's distance to its own border (the watershed's seeds); the centre offsets (HoVer-Net's
maps). Plus the loss weights where nuclei touch, the contours redrawn after a geometric
augmentation, and the nuclei's equivalent diameters (the model's training nucleus size).
:class:`cellseg.datamodule.NucleiDataModule` calls these; nothing here reads files.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.segmentation import find_boundaries

from cellseg.errors import UserError


def targets_from_labels(labels: np.ndarray, channels: int = 1) -> np.ndarray:
    """Float32 (H, W, channels) training targets: foreground, then (2 or more) nucleus
    contours, then (3 or more) each nucleus's distance to its own border, 1 at its centre,
    then (5) each pixel's offset to its nucleus's centre (:func:`centre_offsets`).

    The contour channel marks each nucleus's inner boundary pixels, so touching nuclei are
    separated by a line the network can learn to predict. The distance channel is scaled per
    nucleus, so small and large nuclei alike have cores near 1 that seed the watershed, and
    a zoomed (resampled) target keeps its meaning.
    """
    check_target_channels(channels)
    foreground = labels > 0
    if channels == 1:
        return foreground[..., None].astype(np.float32)
    contours = find_boundaries(labels, mode="inner") & foreground
    if channels == 2:
        return np.stack([foreground, contours], axis=-1).astype(np.float32)
    # 1 on the contour, growing inwards; touching nuclei each keep their own border
    depth = ndimage.distance_transform_edt(foreground & ~contours) + foreground
    peak = ndimage.maximum(depth, labels, np.arange(1, labels.max() + 1))
    scale = np.concatenate([[1.0], np.maximum(peak, 1.0)])
    distance = depth / scale[np.maximum(labels, 0)]
    targets = [foreground, contours, distance]
    if channels == 5:
        targets += list(np.moveaxis(centre_offsets(labels), -1, 0))
    return np.stack(targets, axis=-1).astype(np.float32)


# the network's output channels, in order (1, 2, 3 or all 5 of them: model.net.out_channels)
TARGET_NAMES = ("foreground", "contour", "distance", "offset_row", "offset_col")


def check_target_channels(channels: int) -> None:
    """Refuse a number of output channels that no target is drawn for."""
    if channels not in (1, 2, 3, 5):
        raise UserError(
            f"model.net.out_channels={channels}; use 1 (foreground), 2 (+ contours), "
            "3 (+ contours and distance) or 5 (+ contours, distance and centre offsets)"
        )


def centre_offsets(labels: np.ndarray) -> np.ndarray:
    """Float32 (H, W, 2): each nucleus pixel's row and column offset from its nucleus's centroid,
    divided by the nucleus's largest offset on that axis and mapped from [-1, 1] to [0, 1]
    (0.5 at the centre and in the background).

    HoVer-Net's horizontal and vertical maps (Graham et al. 2019): within a nucleus they rise
    smoothly from 0 to 1 across it, and where two nuclei touch they fall from 1 to 0 in a pixel,
    whatever the image looks like there, so a falling offset marks where to split
    (:func:`cellseg.instances.offset_edges`). Scaled per nucleus, so zoom leaves them alike.
    """
    inside = labels > 0
    out = np.full((*labels.shape, 2), 0.5, np.float32)
    ids, labels = np.unique(labels, return_inverse=True)  # 0..n: crops keep sparse ids
    labels = labels.reshape(inside.shape) + int(ids[0] != 0)
    if not inside.any():
        return out
    index = np.arange(1, labels.max() + 1)
    for axis, coords in enumerate(np.indices(labels.shape, dtype=np.float64)):
        centre = np.concatenate([[0.0], ndimage.mean(coords, labels, index)])
        offset = coords - centre[labels]
        extent = ndimage.maximum(np.abs(offset), labels, index)
        scale = np.concatenate([[1.0], np.maximum(extent, 1.0)])
        out[..., axis] = np.where(inside, 0.5 + 0.5 * offset / scale[labels], 0.5)
    return out


def touching_weights(labels: np.ndarray, weight: float, radius: int = 2) -> np.ndarray:
    """Float32 (H, W) loss weights: ``1 + weight`` on pixels within ``radius`` of two different
    nuclei (the gaps and borders where touching nuclei meet, which a watershed must split), 1
    elsewhere. As the U-Net paper's border weights, without its per-pair distance maps."""
    size, top = 2 * radius + 1, labels.max()
    highest = ndimage.maximum_filter(labels, size=size)
    lowest = ndimage.minimum_filter(np.where(labels > 0, labels, top + 1), size=size)
    touching = (lowest <= top) & (highest != lowest)  # a nucleus in reach, and another one
    return (1.0 + weight * touching).astype(np.float32)


def redraw_contours(target: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The target with its contour channel (1), if any, redrawn from the instance ``labels``."""
    if target.shape[-1] > 1:
        target = target.copy()
        target[..., 1] = find_boundaries(labels, mode="inner") & (labels > 0)
    return target


def equivalent_diameters(labels: np.ndarray) -> np.ndarray:
    """The diameter of the disk of the same area, in pixels, of every object of a label image."""
    areas = np.bincount(labels.ravel())[1:]
    return np.sqrt(4 * areas[areas > 0] / np.pi)
