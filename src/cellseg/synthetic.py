"""The embedded default dataset: synthetic nucleus images written in the dsb2018 layout.

Each image is drawn deterministically from ``(seed, index)``: nuclei of varied size (radius
about 5-25 px) and irregular elliptic shape, often touching, in one of two styles seen in the
2018 Data Science Bowl: fluorescence (dark background, bright nuclei) or stained brightfield
(light background, purple nuclei); then blur, uneven illumination and noise. The files are
written as ``<root>/<id>/images/<id>.png`` and ``<root>/<id>/masks/<id>_<k>.png`` (one binary
PNG per nucleus), so the same reader serves synthetic and real data.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from filelock import FileLock
from PIL import Image
from scipy import ndimage

MARKER = "synthetic.json"


def _nucleus_mask(rng: np.random.Generator, radius: float) -> np.ndarray:
    """A boolean mask of one irregular elliptic nucleus, centred in its own box."""
    half = int(np.ceil(radius * 1.5)) + 2
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    elong = rng.uniform(1.0, 1.6)
    a, b = radius * np.sqrt(elong), radius / np.sqrt(elong)
    u = xx * np.cos(angle) + yy * np.sin(angle)
    v = -xx * np.sin(angle) + yy * np.cos(angle)
    theta = np.arctan2(v, u)
    wobble = 1.0 + sum(
        rng.uniform(0, 0.08) * np.cos(k * theta + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5)
    )
    return (u / a) ** 2 + (v / b) ** 2 <= wobble**2


def _labels(rng: np.random.Generator, size: int) -> np.ndarray:
    """An int32 instance label image with touching but non-overlapping nuclei."""
    labels = np.zeros((size, size), np.int32)
    mean_radius = rng.uniform(5, 20)
    density = rng.uniform(0.15, 0.45)  # fraction of the field covered
    target = int(density * size * size / (np.pi * mean_radius**2)) + 1
    centres: list[tuple[float, float, float]] = []
    for _ in range(target * 20):
        if len(centres) >= target:
            break
        r = float(np.clip(rng.normal(mean_radius, mean_radius * 0.25), 5, 25))
        y, x = rng.uniform(0, size, 2)
        # neighbours may touch (distance slightly below the sum of radii) but not stack
        if all((y - cy) ** 2 + (x - cx) ** 2 > (0.8 * (r + cr)) ** 2 for cy, cx, cr in centres):
            centres.append((y, x, r))
    for k, (y, x, r) in enumerate(centres, start=1):
        shape = _nucleus_mask(rng, r)
        half = shape.shape[0] // 2
        y0, x0 = int(y) - half, int(x) - half
        ys, xs = slice(max(y0, 0), min(y0 + shape.shape[0], size)), slice(
            max(x0, 0), min(x0 + shape.shape[1], size)
        )
        crop = shape[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0]
        free = labels[ys, xs] == 0
        labels[ys, xs][crop & free] = k
    return _relabel(labels)


def _relabel(labels: np.ndarray) -> np.ndarray:
    """Renumber labels 1..N, dropping those left without pixels."""
    ids = np.unique(labels)
    ids = ids[ids > 0]
    lut = np.zeros(labels.max() + 1, np.int32)
    lut[ids] = np.arange(1, len(ids) + 1)
    return lut[labels]


def _render(rng: np.random.Generator, labels: np.ndarray, brightfield: bool) -> np.ndarray:
    """An RGB uint8 image of the nuclei in ``labels``."""
    size = labels.shape[0]
    n = labels.max()
    strength = np.concatenate([[0.0], rng.uniform(0.45, 1.0, n)]).astype(np.float32)
    signal = strength[labels]
    texture = ndimage.gaussian_filter(rng.normal(0, 1, labels.shape), 1.5)
    signal *= 1.0 + 0.25 * texture.astype(np.float32)
    signal = ndimage.gaussian_filter(signal, rng.uniform(0.7, 2.0))
    yy, xx = np.mgrid[0:size, 0:size] / size
    gx, gy = rng.uniform(-0.4, 0.4, 2)
    illumination = 1.0 + gx * (xx - 0.5) + gy * (yy - 0.5)
    if brightfield:
        stain = np.array([0.65, 0.70, 0.29]) * rng.uniform(0.9, 1.1, 3)  # haematoxylin-like
        od = (signal * illumination)[..., None] * 1.6 * stain
        background = np.array([0.93, 0.86, 0.92]) * rng.uniform(0.9, 1.0)
        rgb = background * np.exp(-od)
        rgb += rng.normal(0, rng.uniform(0.01, 0.03), rgb.shape)
    else:
        gray = 0.03 + signal * illumination * rng.uniform(0.4, 0.95)
        gray = rng.poisson(gray * 400) / 400.0 + rng.normal(0, 0.01, gray.shape)
        tint = np.array([1.0, 1.0, 1.0]) if rng.random() < 0.7 else rng.uniform(0.2, 1.0, 3)
        rgb = gray[..., None] * tint
    return (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)


def make_sample(seed: int, index: int, size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Return the (RGB uint8 image, int32 instance labels) of synthetic sample ``index``."""
    rng = np.random.default_rng([seed, index])
    brightfield = rng.random() < 0.3
    labels = _labels(rng, size)
    return _render(rng, labels, brightfield), labels


def write_sample(root: Path, sample_id: str, image: np.ndarray, labels: np.ndarray) -> None:
    """Write one sample in the dsb2018 layout (image PNG + one binary PNG per nucleus)."""
    (root / sample_id / "images").mkdir(parents=True, exist_ok=True)
    (root / sample_id / "masks").mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(root / sample_id / "images" / f"{sample_id}.png")
    for k in range(1, labels.max() + 1):
        mask = ((labels == k) * 255).astype(np.uint8)
        Image.fromarray(mask).save(root / sample_id / "masks" / f"{sample_id}_{k:04d}.png")


def generate(root: str | Path, n_images: int = 50, size: int = 256, seed: int = 0) -> Path:
    """Generate the synthetic dataset into ``root`` unless the same one is already there.

    Jobs started together (a parallel sweep, several processes of one run) share ``root``: a lock
    file beside it lets one of them write while the others wait and then find the set complete.
    """
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(root.with_name(f".{root.name}.lock")):
        return _generate_locked(root, {"n_images": n_images, "size": size, "seed": seed})


def _generate_locked(root: Path, params: dict) -> Path:
    params = {**params, "version": 1}
    marker = root / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == params:
        return root
    if root.exists():
        if not marker.is_file() and any(root.iterdir()):
            raise FileExistsError(
                f"{root} exists and was not made by cellseg's synthetic generator (data=synthetic "
                "writes its images into data.root); for your own images there pass data=dsb2018 "
                "or data=folder, or give the synthetic set a new, empty data.root"
            )
        shutil.rmtree(root)  # an earlier synthetic set with other parameters: regenerate
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed run
    for i in range(params["n_images"]):
        image, labels = make_sample(params["seed"], i, params["size"])
        write_sample(tmp, f"synth_{i:03d}", image, labels)
    (tmp / MARKER).write_text(json.dumps(params))
    tmp.rename(root)  # appears complete or not at all
    return root
