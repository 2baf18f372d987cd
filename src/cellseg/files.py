"""Reading and writing image files: axes from the file, channels, pixel size, 2-D planes.

TIFF and OME-TIFF axes come from ``tifffile``'s series (``YX``, ``YXS``, ``CYX``, ``ZYX``,
``TCZYX``, ImageJ hyperstacks ...), channel names and the pixel size from OME or ImageJ
metadata; OME-Zarr (NGFF 0.4 and 0.5, a local ``*.zarr`` folder) from its multiscales and omero
metadata (the full-resolution level); PNG, JPEG and BMP are 2-D gray, RGB or RGBA. A file is
opened once (:func:`open_image`) and read one 2-D plane (all channels of one time point and Z
plane) at a time, or one window of a plane (:meth:`ImageFile.region`), so memory stays bounded
by what is read: uncompressed TIFFs are memory-mapped, compressed and tiled ones and OME-Zarr
decoded chunk by chunk. Writers put a file in place atomically.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from cellseg.errors import UserError

log = logging.getLogger(__name__)
PLANE_AXES = "TZ"  # leading axes: segmented one 2-D plane at a time
AXES_HELP = "T time, Z plane, C channel, Y, X"
MICRONS = {
    "µm": 1.0,
    "um": 1.0,
    "micron": 1.0,
    "microns": 1.0,
    "\\u00B5m": 1.0,
    "nm": 1e-3,
    "mm": 1e3,
    "m": 1e6,
    "micrometer": 1.0,  # OME-NGFF's unit names
    "nanometer": 1e-3,
    "millimeter": 1e3,
}
ZARR_SUFFIX = ".zarr"  # an OME-Zarr image is a folder named *.zarr (or *.ome.zarr)


class ImageFileError(UserError):
    """An image file cellseg cannot use as it is; the message names the file and the fix."""


@dataclass
class ImageFile:
    """An opened image file: its planes, channels and pixel size; nothing decoded yet."""

    path: Path
    axes: str  # as found in the file (or as given with ``axes=``)
    shape: tuple[int, ...]  # as found in the file
    planes_shape: dict[str, int]  # the leading axes present, e.g. {"Z": 5}; {} for a 2-D image
    channel_names: list[str]  # one per channel
    rgb: bool = False  # an RGB(A) colour image: channels converted as a whole, not selected
    pixel_size: tuple[float, float] | None = None  # (y, x) micrometres per pixel
    channel: int | None = None  # the nuclei channel, see :meth:`select`
    _read: object = field(default=None, repr=False)  # (plane index, ys, xs) -> (y, x, C) array

    @property
    def height(self) -> int:
        return self.shape[self.axes.index("Y")]

    @property
    def width(self) -> int:
        return self.shape[self.axes.index("X")]

    @property
    def stacked(self) -> bool:
        """Whether the file holds more than one 2-D plane."""
        return math.prod(self.planes_shape.values()) > 1

    def plane_indices(self) -> list[dict[str, int]]:
        """Every plane's index, e.g. [{"Z": 0}, {"Z": 1}, ...]; [{}] for a 2-D image."""
        names = list(self.planes_shape)
        return [
            dict(zip(names, i, strict=True))
            for i in product(*map(range, self.planes_shape.values()))
        ]

    def plane(self, index: dict[str, int] | None = None) -> np.ndarray:
        """All channels of one plane as (Y, X, C), non-finite pixels replaced (with a warning)."""
        return self.region(index, slice(None), slice(None))

    def region(self, index: dict[str, int] | None, ys: slice, xs: slice) -> np.ndarray:
        """All channels of a window ``[ys, xs]`` of one plane as (y, x, C): only the window's
        pixels are read where the file allows (memory maps, TIFF tiles and strips, zarr
        chunks); non-finite pixels replaced (with a warning)."""
        where = f"{self.path}" + "".join(f" {a}={i}" for a, i in (index or {}).items())
        try:
            array = self._read(index or {}, ys, xs)
        except Exception as err:  # noqa: BLE001 - truncated data, junk pages, codecs
            raise ImageFileError(
                f"cannot read image {where}: {type(err).__name__}: {err}; replace or remove "
                "the file"
            ) from err
        return replace_nonfinite(array, where)

    def planes(self) -> Iterator[tuple[dict[str, int], np.ndarray]]:
        """(index, (Y, X, C) plane) one after another."""
        for index in self.plane_indices():
            yield index, self.plane(index)

    def select(self, channel: int | str | None) -> ImageFile:
        """Choose the nuclei channel by index or name; errors list the channels found."""
        n = len(self.channel_names)
        listing = ", ".join(f"{i}={name}" for i, name in enumerate(self.channel_names))
        if channel is None or channel == "" or n == 1:  # one channel: nothing to choose
            if n > 1 and not self.rgb:
                raise ImageFileError(
                    f"{self.path} has {n} channels ({listing}); choose the nuclei channel with "
                    "channel=<index or name>"
                )
            self.channel = None
            return self
        names = [name.lower() for name in self.channel_names]
        if isinstance(channel, str) and not channel.lstrip("-").isdigit():
            if channel.lower() not in names:
                raise ImageFileError(
                    f"{self.path} has no channel named {channel!r} ({listing}); "
                    "set channel= to one of these names or indices"
                )
            self.channel = names.index(channel.lower())
            return self
        if not 0 <= int(channel) < n:
            raise ImageFileError(
                f"{self.path} has {n} channels ({listing}); channel={channel} is not one of them"
            )
        self.channel = int(channel)
        return self

    def nuclei(self, plane: np.ndarray) -> np.ndarray:
        """The network's input channels of a plane: the selected channel, or all of them."""
        return plane if self.channel is None else plane[..., self.channel : self.channel + 1]


def stem(path: Path) -> str:
    """A file's image id: its name without the suffix (``.ome.tif`` counted as one)."""
    name = path.stem
    return name[: -len(".ome")] if name.lower().endswith(".ome") else name


def open_image(path: str | Path, axes: str | None = None) -> ImageFile:
    """Open an image file: axes, channels and pixel size from the file; errors name the file."""
    path = Path(path)
    if path.is_dir() and path.suffix.lower() != ZARR_SUFFIX:
        raise ImageFileError(f"{path} is a folder, not an image file; move it out of the input")
    if path.is_file() and path.stat().st_size == 0:
        raise ImageFileError(f"cannot read image {path}: the file is empty (0 bytes); replace "
                             "or remove it")
    try:
        if path.suffix.lower() == ZARR_SUFFIX:
            return _open_zarr(path, axes)
        if path.suffix.lower() in (".tif", ".tiff"):
            return _open_tiff(path, axes)
        return _open_pil(path)
    except ImageFileError:
        raise
    except Exception as err:  # noqa: BLE001 - a damaged file breaks a decoder in any way
        # (IndexError from a header without pages, KeyError, struct/zlib errors, ...)
        raise ImageFileError(
            f"cannot read image {path}: {type(err).__name__}: {err}; replace or remove the file"
        ) from err


def read_image(path: str | Path, channel: int | str | None = None) -> np.ndarray:
    """One 2-D image as (H, W, C) (channel ``channel``, or all of gray/RGB/RGBA).

    For training data and masks: files with several planes are refused with the fix.
    """
    image = open_image(path).select(channel)
    if image.stacked:
        raise ImageFileError(
            f"{path} has axes {image.axes} and shape {image.shape}: several planes "
            f"({image.planes_shape}); training reads 2-D images, save one file per plane"
        )
    return image.nuclei(image.plane())


def replace_nonfinite(array: np.ndarray, where: str | Path) -> np.ndarray:
    """Set NaN/inf pixels to the lowest finite value (0 if none), with a warning naming them."""
    if not np.issubdtype(array.dtype, np.floating):
        return array
    bad = ~np.isfinite(array)
    count = int(bad.sum())
    if count:
        finite = array[~bad]
        fill = finite.min() if finite.size else 0.0
        log.warning(
            "%s: %d NaN/inf pixels set to the image's lowest finite value %g", where, count, fill
        )
        array = np.where(bad, fill, array).astype(array.dtype, copy=False)
    return array


def _open_pil(path: Path) -> ImageFile:
    with Image.open(path) as im:
        im.load()
        mode = im.mode
        array = np.asarray(im)
    if array.size == 0:
        raise ImageFileError(f"cannot read image {path}: it holds no pixels; replace or remove it")
    if array.ndim == 2:
        array = array[..., None]
    names = list(mode) if mode in ("RGB", "RGBA") else ["gray"]
    rgb = mode in ("RGB", "RGBA")
    if mode in ("LA", "RGBA"):  # the alpha channel holds no signal: neither input nor measured
        array, names = array[..., :-1], names[:3]
    return ImageFile(
        path,
        "YXS" if array.shape[-1] > 1 else "YX",
        array.shape,
        {},
        names,
        rgb=rgb,
        _read=lambda index, ys, xs: array[ys, xs],
    )


def _open_tiff(path: Path, axes: str | None) -> ImageFile:
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        found, shape = series.axes, tuple(series.shape)
        mappable = series.dataoffset is not None and series.keyframe.is_memmappable
        rgb_photometric = series.keyframe.photometric == tifffile.PHOTOMETRIC.RGB
        described = tif.is_ome or tif.is_imagej
        names, pixel_size = _ome_metadata(tif) if tif.is_ome else (None, None)
        if tif.is_imagej:
            pixel_size = _imagej_pixel_size(tif)
    given = axes.upper() if axes else None
    if not given and not described and found.startswith("S") and found.endswith("YX"):
        # 3 or 4 planes stored one after another as "RGB(A)": what numpy stacks of Z planes
        # or channels become when written without axes; real colour images interleave
        raise ImageFileError(
            f"{path} holds {shape[0]} planes of {shape[1]}x{shape[2]} that its file calls "
            "colour (RGB, stored plane by plane) but that may be Z planes or channels; pass "
            "axes=ZYX (planes), axes=CYX (channels) or axes=SYX (a colour image)"
        )
    if mappable:  # uncompressed, contiguous: a window reads only its own bytes
        array = tifffile.memmap(path, series=0, mode="r")
    else:  # compressed, tiled or in strips: decoded chunk (tile, strip, page) by chunk
        import zarr

        array = zarr.open(tifffile.imread(path, series=0, level=0, aszarr=True), mode="r")
    return _image_file(path, given or found, shape, given, names, pixel_size, array,
                       rgb_photometric)


def _open_zarr(path: Path, axes: str | None) -> ImageFile:
    """An OME-Zarr image (NGFF 0.4 or 0.5): its full-resolution level, read chunk by chunk."""
    import zarr

    try:
        group = zarr.open_group(path, mode="r")
    except Exception as err:  # noqa: BLE001 - not a zarr group at all
        raise ImageFileError(f"cannot read {path}: not a zarr folder ({err}); pass an OME-Zarr "
                             "image folder") from err
    attrs = dict(group.attrs)
    meta = attrs.get("ome", attrs)  # NGFF 0.5 nests its metadata under "ome"
    if not meta.get("multiscales"):
        raise ImageFileError(
            f"{path} is a zarr folder without OME-NGFF multiscales metadata; pass the image's "
            "own folder (the one holding the resolution levels 0, 1, ...)"
        )
    scales = meta["multiscales"][0]
    names = [a["name"] if isinstance(a, dict) else a for a in scales.get("axes", [])]
    units = {a["name"].upper(): a.get("unit")
             for a in scales.get("axes", []) if isinstance(a, dict)}
    level = scales["datasets"][0]
    array = group[level["path"]]
    found = "".join(names).upper() or "TCZYX"[-array.ndim :]
    scale = next((t["scale"] for t in level.get("coordinateTransformations", [])
                  if t.get("type") == "scale"), None)
    pixel_size = None
    if scale and "Y" in found and "X" in found:
        factors = [MICRONS.get(units.get(a) or "micrometer") for a in "YX"]
        if None not in factors:
            pixel_size = tuple(scale[found.index(a)] * f for a, f in zip("YX", factors,
                                                                          strict=True))
    channels = meta.get("omero", {}).get("channels", [])
    labels = [c.get("label") or f"c{i}" for i, c in enumerate(channels)] or None
    given = axes.upper() if axes else None
    return _image_file(path, given or found, tuple(array.shape), given, labels, pixel_size, array)


def _image_file(path: Path, use: str, shape: tuple, given: str | None, names: list | None,
                pixel_size: tuple | None, array, rgb_photometric: bool = False) -> ImageFile:
    """An :class:`ImageFile` over an array in the file's axis order ``use``, its axes checked."""
    if given and len(given) != len(shape):
        raise ImageFileError(
            f"{path} has shape {shape}; axes={given} names {len(given)} axes, "
            f"not {len(shape)} ({AXES_HELP})"
        )
    sizes = dict(zip(use, shape, strict=True))
    problems = [a for a, n in sizes.items() if a not in PLANE_AXES + "CSYX" and n > 1]
    if "Y" not in sizes or "X" not in sizes or problems or len(set(use)) < len(use):
        raise ImageFileError(
            f"{path} has axes {use} and shape {shape}: cellseg cannot tell what "
            f"{'/'.join(problems) or 'they'} hold; pass axes= naming each axis ({AXES_HELP}), "
            f"e.g. axes={_suggest(shape)}"
        )
    if sizes.get("C", 1) > 1 and sizes.get("S", 1) > 1:
        raise ImageFileError(
            f"{path} has axes {use} and shape {shape}: channels (C) of several samples (S); "
            "save one sample per channel"
        )
    channel_axis = "C" if sizes.get("C", 1) > 1 or "S" not in sizes else "S"
    n_channels = sizes.get(channel_axis, 1)
    if not names or len(names) != n_channels:
        names = [f"c{i}" for i in range(n_channels)]
    planes_shape = {a: sizes[a] for a in PLANE_AXES if sizes.get(a, 1) > 1}
    rgb = channel_axis == "S" and rgb_photometric and n_channels in (3, 4)
    return ImageFile(path, use, shape, planes_shape, names, rgb=rgb, pixel_size=pixel_size,
                     _read=_ArrayReader(array, use))


def _suggest(shape: tuple[int, ...]) -> str:
    if len(shape) == 3:
        return "CYX" if shape[0] < min(shape[1:]) else "YXC"
    return ("TZCYX"[-len(shape) :]) if len(shape) <= 5 else "TZCYX"


class _ArrayReader:
    """Windows of planes of an array in the file's own axis order: a memory map, a zarr array
    (decoded chunk by chunk) or an array in memory; only the window is read."""

    def __init__(self, array, axes: str) -> None:
        self.array, self.axes = array, axes
        kept = [a for a in axes if a in "YXCS"]
        self.order = [kept.index(a) for a in "YX"] + [i for i, a in enumerate(kept) if a in "CS"]

    def __call__(self, index: dict[str, int], ys: slice, xs: slice) -> np.ndarray:
        key = tuple(
            ys if a == "Y" else xs if a == "X" else slice(None) if a in "CS" else index.get(a, 0)
            for a in self.axes
        )
        window = np.ascontiguousarray(np.transpose(np.asarray(self.array[key]), self.order))
        return window.reshape(*window.shape[:2], -1)  # (y, x[, C][, S]) -> (y, x, C)


def _ome_metadata(tif: tifffile.TiffFile) -> tuple[list[str] | None, tuple | None]:
    """OME channel names and (y, x) pixel size in micrometres of the first image."""
    root = ET.fromstring(tif.ome_metadata)
    pixels = next((e for e in root.iter() if e.tag.endswith("}Pixels")), None)
    if pixels is None:
        return None, None
    names = [
        c.get("Name") or f"c{i}"
        for i, c in enumerate(e for e in pixels if e.tag.endswith("}Channel"))
    ]
    sizes = []
    for axis in "YX":
        value, unit = pixels.get(f"PhysicalSize{axis}"), pixels.get(f"PhysicalSize{axis}Unit", "µm")
        sizes.append(float(value) * MICRONS[unit] if value and unit in MICRONS else None)
    return names or None, tuple(sizes) if None not in sizes else None


def _imagej_pixel_size(tif: tifffile.TiffFile) -> tuple[float, float] | None:
    """ImageJ's pixel size (resolution tags in pixels per unit) in micrometres."""
    unit = (tif.imagej_metadata or {}).get("unit")
    tags = tif.pages[0].tags
    if unit not in MICRONS or "XResolution" not in tags or "YResolution" not in tags:
        return None
    (xn, xd), (yn, yd) = tags["XResolution"].value, tags["YResolution"].value
    return (yd / yn * MICRONS[unit], xd / xn * MICRONS[unit]) if xn and yn else None


@contextmanager
def atomic(path: Path) -> Iterator[Path]:
    """A temporary name beside ``path`` to write to; renamed to ``path`` only on success, so a
    half-written file never takes the final name."""
    tmp = path.with_name(f".{path.name}.partial.{os.getpid()}")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


PNG_COMPRESSION = 1  # zlib level: the same pixels, written about 4x faster than PIL's default 6


def save_png(path: Path, array: np.ndarray) -> None:
    """Write a PNG atomically (16-bit labels as 16-bit gray), compressed lightly: in a predict
    run the default level spent as long on PNGs as on measuring every nucleus."""
    with atomic(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG", compress_level=PNG_COMPRESSION)


def save_stack(
    path: Path, pages: Iterable[np.ndarray], shape: tuple[int, ...], axes: str, dtype=np.uint16,
    pixel_size: tuple[float, float] | None = None,
) -> None:
    """Write 2-D pages (in C order over the leading axes) as one multi-page TIFF with ``axes``,
    atomically; the pages are written as they come, so one page is in memory at a time. An
    ImageJ hyperstack where the axes come in ImageJ's order (TZYX, ZYX, TYX: Fiji opens it with
    its planes apart), calibrated in µm by ``pixel_size`` (y, x) where known."""
    imagej = is_subsequence(axes, "TZCYXS")
    options = {"imagej": imagej, "metadata": {"axes": axes}}
    if imagej and pixel_size:
        options["metadata"]["unit"] = "um"
        options["resolution"] = (1 / pixel_size[1], 1 / pixel_size[0])
    with atomic(path) as tmp:
        tifffile.imwrite(tmp, iter(pages), shape=shape, dtype=dtype, **options)


def is_subsequence(part: str, whole: str) -> bool:
    """Whether the letters of ``part`` appear in ``whole`` in the same order."""
    letters = iter(whole)
    return all(letter in letters for letter in part)


def plane_name(path: Path, index: dict[str, int] | None) -> str:
    """``stack.tif z3``: a plane as the log names it (``stack.tif`` for a 2-D image)."""
    return path.name + "".join(f" {axis.lower()}{i}" for axis, i in (index or {}).items())


def plane_suffix(index: dict[str, int]) -> str:
    """``_t0_z3`` for a plane index (how a plane's own outputs are named); empty for 2-D."""
    return "".join(f"_{axis.lower()}{i}" for axis, i in index.items())


def write_rows(path: Path, rows: list[dict]) -> None:
    """A CSV file of dict rows (columns in first-seen order), written atomically."""
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with atomic(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)
