"""Microscopy test files built from a real fluorescence field (or synthetic disks without it)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import tifffile
from skimage.draw import disk

from helpers import REAL_DATA


@cache
def nuclei_field(size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """A (size, size) uint16 grayscale fluorescence field and its instance labels: a crop of the
    first dark grayscale DSB2018 image, or synthetic disks when the real data are absent."""
    if REAL_DATA.is_dir():
        from cellseg.datasets import list_sources

        for source in list_sources(REAL_DATA, "dsb2018"):
            sample = source.read()
            gray = sample.image[..., 0]
            if (sample.image[..., :3].std(axis=-1).max() == 0 and gray.mean() < 100
                    and min(gray.shape) >= size):
                labels = sample.labels[:size, :size]
                if len(np.unique(labels)) > 4:
                    return gray[:size, :size].astype(np.uint16) * 257, relabel(labels)
    rng = np.random.default_rng(0)
    image, labels = np.zeros((size, size), np.float32), np.zeros((size, size), np.int32)
    for k in range(1, 9):
        rr, cc = disk(tuple(rng.integers(10, size - 10, 2)), rng.integers(5, 9), shape=image.shape)
        labels[rr, cc], image[rr, cc] = k, rng.uniform(0.5, 1.0)
    image += rng.normal(0, 0.05, image.shape)
    return (np.clip(image, 0, 1) * 60000).astype(np.uint16), relabel(labels)


def relabel(labels: np.ndarray) -> np.ndarray:
    """Labels renumbered 1..N in order of first appearance (a crop drops some)."""
    values = np.unique(labels[labels > 0])
    lut = np.zeros(labels.max() + 1, np.int32)
    lut[values] = np.arange(1, len(values) + 1)
    return lut[labels]


def write_ome(path: Path, size: int = 96, pixel_size: float = 0.5) -> np.ndarray:
    """A (C=2, Y, X) OME-TIFF: DAPI (the field) and a noise channel; returns the data."""
    field, _ = nuclei_field(size)
    noise = np.random.default_rng(1).integers(0, 4000, field.shape).astype(np.uint16)
    data = np.stack([field, noise])
    metadata = {"axes": "CYX", "Channel": {"Name": ["DAPI", "noise"]},
                "PhysicalSizeX": pixel_size, "PhysicalSizeY": pixel_size}
    tifffile.imwrite(path, data, metadata=metadata)
    return data


def write_stack(path: Path, planes: int = 3, size: int = 96) -> np.ndarray:
    """A (Z, Y, X) stack of shifted copies of the field; returns the data."""
    field, _ = nuclei_field(size)
    data = np.stack([np.roll(field, 7 * z, axis=1) for z in range(planes)])
    tifffile.imwrite(path, data, metadata={"axes": "ZYX"})
    return data


def write_nan(path: Path, size: int = 96) -> np.ndarray:
    """The field as float32 with a block of NaN and a few inf pixels; returns the data."""
    field, _ = nuclei_field(size)
    data = field.astype(np.float32) / 65535
    data[:16, :16] = np.nan
    data[-1, -3:] = np.inf
    tifffile.imwrite(path, data)
    return data
