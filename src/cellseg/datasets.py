"""Readers for the supported dataset layouts, channel conversion and intensity normalisation.

Layouts:
- ``dsb2018``: ``<root>/<id>/images/<id>.png`` and ``<root>/<id>/masks/*.png``, one binary PNG
  per nucleus (the 2018 Data Science Bowl's Kaggle layout; also what ``synthetic`` writes).
- ``folder``: ``<root>/images/<stem>.<ext>`` and ``<root>/masks/<stem>.<ext>`` with matching
  stems; a mask is binary (nuclei become its connected components) or instance-labelled.

Files are read by :mod:`cellseg.files` (axes, channels and NaN pixels are handled there);
``channel`` picks the nuclei channel of multi-channel images (e.g. OME-TIFFs).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from skimage.measure import label as connected_components

from cellseg.cli import progress
from cellseg.errors import UserError
from cellseg.files import read_image, replace_nonfinite, stem

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")


@dataclass
class Sample:
    """One image with its instance labels (0 = background, 1..N = nuclei) at native size."""

    id: str
    image: np.ndarray  # (H, W, C), as stored (uint8, uint16 or float)
    labels: np.ndarray  # (H, W) int32


def to_channels(image: np.ndarray, in_channels: int) -> np.ndarray:
    """Convert grayscale, RGB or RGBA to ``in_channels`` (1 or 3) as (H, W, C)."""
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] == 4:
        image = image[..., :3]  # DSB PNGs are RGBA with an opaque alpha channel
    if image.shape[-1] == in_channels:
        return image
    if in_channels == 3 and image.shape[-1] == 1:
        return np.repeat(image, 3, axis=-1)
    if in_channels == 1 and image.shape[-1] == 3:
        weights = np.array([0.299, 0.587, 0.114], np.float32)
        return (image.astype(np.float32) @ weights)[..., None]
    raise UserError(f"cannot convert an image with {image.shape[-1]} channels to {in_channels}")


def normalize(
    image: np.ndarray, method: str = "percentile", limits: tuple[float, float] | None = None
) -> np.ndarray:
    """Scale an image to float32 in about [0, 1].

    ``percentile``: per image, the 1st and 99.8th percentiles map to 0 and 1 (robust to 16-bit
    and dim images); ``scale``: divide by the dtype's maximum (the study's /255);
    ``minmax``: per image minimum and maximum. NaN/inf pixels count as the lowest finite value.
    ``limits``: the values mapping to 0 and 1, found before (:func:`intensity_limits`) on the
    whole of an image this is a block of.
    """
    image = replace_nonfinite(image, "an image")  # the readers have warned naming the file
    lo, hi = limits if limits is not None else intensity_limits(image, method)
    x = image.astype(np.float32)  # the one full-size copy; the rest is in place
    x -= np.float32(lo)
    x /= np.float32(max(hi - lo, 1e-6))
    return np.clip(x, 0.0, 1.0, out=x) if method != "scale" else x


def intensity_limits(image: np.ndarray, method: str = "percentile") -> tuple[float, float]:
    """The values :func:`normalize` maps to 0 and 1 for an image (see there)."""
    if method == "scale":
        top = np.iinfo(image.dtype).max if np.issubdtype(image.dtype, np.integer) else 1.0
        return 0.0, float(top)
    if method == "percentile":
        lo, hi = np.percentile(image, (1.0, 99.8))  # on the stored dtype: a smaller copy
    elif method == "minmax":
        lo, hi = image.min(), image.max()
    else:
        raise UserError(f"unknown normalisation {method!r}; use percentile, scale or minmax")
    return float(lo), float(hi)


def prepare_image(
    image: np.ndarray, in_channels: int = 3, method: str = "percentile",
    invert_bright: bool = False, intensity: dict | None = None,
) -> np.ndarray:
    """The model's input from a stored image: channels, normalisation, optional inversion.

    ``invert_bright`` turns light-background images (stained brightfield: mean above 0.5 after
    normalisation) into dark-background ones, so every image looks like fluorescence.
    ``intensity`` (:func:`image_intensity` of the whole image) fixes both for a block of it.
    """
    limits = intensity["limits"] if intensity else None
    x = normalize(to_channels(image, in_channels), method, limits)
    invert = intensity["invert"] if intensity else invert_bright and x.mean() > 0.5
    if invert:
        x = np.subtract(1.0, x, out=x)  # x is normalize()'s own copy
    return x


def image_intensity(image: np.ndarray, in_channels: int, method: str,
                    invert_bright: bool) -> dict:
    """What :func:`prepare_image` decides from a whole image (its normalisation limits and
    whether it is inverted), found on ``image`` (for a large one, a subsample of it), to be
    applied alike to every block."""
    x = to_channels(image, in_channels)
    limits = intensity_limits(replace_nonfinite(x, "an image"), method)
    invert = bool(invert_bright and normalize(x, method, limits).mean() > 0.5)
    return {"limits": limits, "invert": invert}


def image_kind(image: np.ndarray) -> str:
    """``"colour"`` when an image's RGB channels differ (stained brightfield, e.g. H&E), else
    ``"grey"`` (fluorescence or unstained brightfield, even stored as RGB): a mean channel spread
    above 2 % of the range."""
    if image.ndim < 3 or image.shape[-1] < 3:
        return "grey"
    rgb = image[..., :3].astype(np.float64)
    spread = float((rgb.max(-1) - rgb.min(-1)).mean())
    return "colour" if spread > 0.02 * max(float(rgb.max()), 1.0) else "grey"


# nearest: pixel centre to pixel centre, as the others map (cv2.INTER_NEAREST maps corners: its
# labels came back from a rescaled segmentation up to 1.3 px down and right of their nuclei)
INTERPOLATIONS = {"area": cv2.INTER_AREA, "nearest": cv2.INTER_NEAREST_EXACT,
                  "linear": cv2.INTER_LINEAR, "cubic": cv2.INTER_CUBIC}


def resize(array: np.ndarray, size: int | tuple[int, int], method: str = "area") -> np.ndarray:
    """Resize an (H, W[, C]) array to ``size`` (a side, or (H, W)); ``area`` averaging for
    downscaling images, ``cubic`` for enlarging them, ``nearest`` for labels, ``linear`` for
    probability maps."""
    h, w = (size, size) if isinstance(size, int) else size
    out = cv2.resize(array, (w, h), interpolation=INTERPOLATIONS[method])
    return out[..., None] if array.ndim == 3 and out.ndim == 2 else out


def labels_from_mask(mask: np.ndarray, path: Path | str = "mask") -> np.ndarray:
    """Instance labels from a mask: binary -> connected components, labelled -> as is."""
    if mask.ndim == 3:
        mask = mask[..., 0]
    values = np.unique(mask)
    if len(values) <= 2:
        return connected_components(mask > 0, connectivity=1).astype(np.int32)
    if not np.issubdtype(mask.dtype, np.integer):
        raise UserError(f"{path} has {len(values)} non-integer values; expected binary or labels")
    return mask.astype(np.int32)


def _check_same_size(image: np.ndarray, labels: np.ndarray, path: Path) -> None:
    if image.shape[:2] != labels.shape:
        raise UserError(
            f"mask {path} is {labels.shape[1]}x{labels.shape[0]} but its image is "
            f"{image.shape[1]}x{image.shape[0]}; masks must match their image's size"
        )


def read_dsb2018_sample(folder: Path, channel: int | str | None = None) -> Sample:
    """Read ``<folder>/images/<id>.png`` and merge ``<folder>/masks/*.png`` into labels."""
    image = read_image(folder / "images" / f"{folder.name}.png", channel)
    mask_dir = folder / "masks"
    if not mask_dir.is_dir():
        raise FileNotFoundError(f"{mask_dir} is missing: {folder.name} has no annotation")
    labels = np.zeros(image.shape[:2], np.int32)
    for k, mask_path in enumerate(sorted(mask_dir.glob("*.png")), start=1):
        mask = read_image(mask_path)
        mask = mask[..., 0] if mask.ndim == 3 else mask
        _check_same_size(image, mask, mask_path)
        labels[mask > 0] = k  # an empty masks/ folder means an image without nuclei
    return Sample(folder.name, image, labels)


@dataclass(frozen=True)
class Source:
    """Where one sample is stored: its id, and ``read()``, which decodes it into a Sample."""

    id: str
    read: Callable[[], Sample]


def dsb2018_sources(root: str | Path, channel: int | str | None = None) -> list[Source]:
    """The annotated samples of a dsb2018-layout folder, sorted by id (nothing decoded)."""
    root = _existing_dir(root)
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        broken = [p for p in root.iterdir() if p.is_symlink() and not p.exists()]
        if broken:  # e.g. sample50's links made where the images are not
            raise FileNotFoundError(
                f"{root}: its {len(broken)} entries are links to nothing (the first to "
                f"{broken[0].readlink()}); link them to where the images are"
            )
        raise FileNotFoundError(f"{root} holds no <id>/images/<id>.png samples (dsb2018 layout)")
    sources = []
    for folder in folders:
        image_path = folder / "images" / f"{folder.name}.png"
        if not image_path.is_file():
            raise FileNotFoundError(
                f"{image_path} is missing (dsb2018 layout: <id>/images/<id>.png)"
            )
        if not (folder / "masks").is_dir():
            warnings.warn(f"{folder} has no masks/ folder: skipped (unannotated)", stacklevel=2)
            continue
        sources.append(Source(folder.name, partial(read_dsb2018_sample, folder, channel)))
    return sources


def folder_sources(root: str | Path, channel: int | str | None = None) -> list[Source]:
    """``<root>/images`` and ``<root>/masks`` paired by file stem, sorted (nothing decoded)."""
    root = _existing_dir(root)
    absent = [d for d in ("images", "masks") if not (root / d).is_dir()]
    if absent:
        found = sorted(f"{p.name}/" for p in root.iterdir() if p.is_dir()) or ["no folders"]
        raise FileNotFoundError(
            f"{root} has no {' and no '.join(f'{d}/' for d in absent)} folder: the folder layout "
            f"is images/<name>.png with masks/<name>.png of the same name (found: "
            f"{', '.join(found[:5])})"
        )
    images = {stem(p): p for p in image_files(root / "images")}
    masks = {stem(p): p for p in image_files(root / "masks")}
    if not images:
        raise FileNotFoundError(f"{root / 'images'} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    missing = sorted(set(images) - set(masks))
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} images in {root / 'images'} have no mask in {root / 'masks'} "
            f"with the same stem ({', '.join(missing[:5])}{', ...' * (len(missing) > 5)}); "
            "add their masks or move the images out of images/"
        )
    return [
        Source(stem, partial(read_folder_sample, stem, images[stem], masks[stem], channel))
        for stem in sorted(images)
    ]


def read_folder_sample(
    stem: str, image_path: Path, mask_path: Path, channel: int | str | None = None
) -> Sample:
    """One image (its ``channel``, if it has several) and its label or binary mask image."""
    image = read_image(image_path, channel)
    labels = labels_from_mask(read_image(mask_path), mask_path)
    _check_same_size(image, labels, mask_path)
    return Sample(stem, image, labels)


def image_files(folder: Path) -> list[Path]:
    """Image files in a folder (by suffix), sorted; other files are ignored."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    return sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )


LAYOUTS = {"dsb2018": dsb2018_sources, "synthetic": dsb2018_sources, "folder": folder_sources}


def list_sources(
    root: str | Path, layout: str, channel: int | str | None = None
) -> list[Source]:
    """The samples of a dataset of the given layout, found but not decoded."""
    if layout not in LAYOUTS:
        raise UserError(f"unknown data layout {layout!r}; choose one of {sorted(LAYOUTS)}")
    return LAYOUTS[layout](root, channel)


def root_layout(root: str | Path) -> str:
    """The layout of a folder of annotated images: ``folder`` when it has ``images/``, else
    ``dsb2018`` (one folder per image)."""
    return "folder" if (_existing_dir(root) / "images").is_dir() else "dsb2018"


def renamed(source: Source, new_id: str) -> Source:
    """The same stored sample under another id (its Sample carries the new id too)."""
    return Source(new_id, partial(_read_renamed, source.read, new_id))


def _read_renamed(read: Callable[[], Sample], new_id: str) -> Sample:
    sample = read()
    sample.id = new_id
    return sample


def training_sources(
    roots: list[str | Path] | tuple = (), channel: int | str | None = None
) -> list[Source]:
    """The samples of more folders (``data.train_roots``), each id prefixed with its folder's
    name (``dsb2018-pool/<id>``) so that folders with the same file names do not collide; each
    folder's layout is read from it (:func:`root_layout`)."""
    sources = []
    for root in roots:
        prefix = Path(root).expanduser().name
        for source in list_sources(root, root_layout(root), channel):
            sources.append(renamed(source, f"{prefix}/{source.id}"))
    ids = [s.id for s in sources]
    if len(set(ids)) != len(ids):
        raise UserError(
            f"data.train_roots={list(map(str, roots))} holds two folders of the same name; "
            "give each its own folder name"
        )
    return sources


def all_sources(
    root: str | Path, layout: str, channel: int | str | None = None,
    train_roots: list[str | Path] | tuple = (),
) -> dict[str, Source]:
    """A dataset's samples by id: ``root``'s (split into train / val / test) and those of the
    ``train_roots`` (training side only), found but not decoded."""
    sources = {s.id: s for s in list_sources(root, layout, channel)}
    for source in training_sources(train_roots or (), channel):
        sources[source.id] = source
    return sources


def run_sources(hparams: Mapping[str, Any], root: str | Path | None = None) -> dict[str, Source]:
    """:func:`all_sources` of the data a training run read, from its datamodule's hyperparameters
    (``describe_data(checkpoint)["hparams"]``): its root (or ``root``, where it has moved) and
    its extra training folders."""
    return all_sources(root or hparams["root"], hparams["layout"], hparams.get("channel"),
                       hparams.get("train_roots") or ())


def iter_samples(sources: list[Source], description: str) -> Iterator[Sample]:
    """Decode the sources one after another (a progress bar from 20 of them on)."""
    for source in _progress(sources, description):
        yield source.read()


def read_samples(
    root: str | Path, layout: str, channel: int | str | None = None
) -> list[Sample]:
    """Read a dataset of the given layout."""
    sources = list_sources(root, layout, channel)
    return list(iter_samples(sources, f"Reading {Path(root).name}"))


def _existing_dir(root: str | Path) -> Path:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"data.root {root} does not exist; point data.root at your dataset "
            "(see data/README.md)"
        )
    return root


def _progress(items: list, description: str):
    return progress(items, description, at_least=20)


def split_ids(ids: list[str], test_size: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """Split like ``train_test_split(ids, test_size=test_size, random_state=seed)``."""
    n = len(ids)
    n_test = math.ceil(test_size * n) if isinstance(test_size, float) else int(test_size)
    if not 0 < n_test < n:
        raise UserError(
            f"a held-out fraction of {test_size} leaves no image on one side of {n}; "
            "change data.test_size / data.val_size or add images"
        )
    order = np.random.RandomState(seed).permutation(n)
    return [ids[i] for i in order[n_test:]], [ids[i] for i in order[:n_test]]


def make_splits(
    ids: list[str], test_size: float, val_size: float, seed: int,
    extra: Sequence[str] = (),
) -> dict[str, list[str]]:
    """Train / val / test ids: the test split first, then ``val_size`` off the training ids
    and the ``extra`` ones (images of ``data.train_roots``, which never test); without
    ``val_size`` the test images also validate (the study)."""
    train, test = split_ids(ids, test_size, seed) if test_size else (list(ids), [])
    train = train + sorted(extra)
    val = test
    if val_size:
        train, val = split_ids(train, val_size, seed)
    if not train:
        raise UserError(f"no training images among the {len(ids) + len(extra)} found")
    return {"train": train, "val": val, "test": test}


SAMPLE50_IDS = Path(__file__).parent / "samples" / "dsb2018_sample50_ids.txt"


def sample50_split() -> dict[str, list[str]]:
    """The ``train`` (40) and ``test`` (10) ids of ``sample50``, the 50-image sample of the DSB
    2018 ``stage1_train`` set on which every number in the docs is measured: the study's split
    of its own id list (``SAMPLE50_IDS``), whatever else the folder holding them holds."""
    ids = sorted(SAMPLE50_IDS.read_text().split())
    train, test = split_ids(ids, 0.2, 0)
    return {"train": train, "test": test}


def read_sample50(root: str | Path) -> tuple[dict[str, Sample], dict[str, list[str]]]:
    """``sample50``'s 50 samples by id, read from ``root`` (a Kaggle-layout folder holding them:
    the sample itself or the whole ``stage1_train``), and :func:`sample50_split`."""
    split = sample50_split()
    wanted = set(split["train"] + split["test"])
    sources = {s.id: s for s in dsb2018_sources(root) if s.id in wanted}
    missing = sorted(wanted - set(sources))
    if missing:
        raise UserError(
            f"{root} lacks {len(missing)} of sample50's 50 images (e.g. {missing[0]}); pass the "
            "folder that holds them: the DSB 2018 stage1_train or its 50-image sample"
        )
    return {s.id: s for s in iter_samples(list(sources.values()), "Reading sample50")}, split
