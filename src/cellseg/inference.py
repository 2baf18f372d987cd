"""Whole-image prediction at any size: padding, overlapping tiles, test-time augmentation.

The contract with the rest of cellseg: :mod:`cellseg.checkpoint` loads a model and its input
preparation (the dict :func:`segment` consumes), and :func:`segment` returns numpy arrays in CPU
memory whatever device runs the network (as MONAI, the network's device is not the device that
accumulates the result).
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cellseg.datasets import prepare_image, resize
from cellseg.errors import UserError
from cellseg.instances import THRESHOLD, labels_from_probs, labels_within

log = logging.getLogger(__name__)


def dihedral(x: Tensor, k: int) -> Tensor:
    """The k-th of the 8 flips/rotations of (N, C, H, W) tensors (k = 0 is the identity)."""
    x = torch.rot90(x, k % 4, dims=(-2, -1))
    return torch.flip(x, dims=(-1,)) if k >= 4 else x


def undo_dihedral(x: Tensor, k: int) -> Tensor:
    """The inverse of :func:`dihedral`."""
    x = torch.flip(x, dims=(-1,)) if k >= 4 else x
    return torch.rot90(x, -(k % 4), dims=(-2, -1))


def turn_offsets(probs: Tensor, k: int) -> Tensor:
    """Probabilities predicted on ``dihedral(x, k)`` and put back in place by
    :func:`undo_dihedral`, with their centre offsets (channels 3, 4 of five) turned back too:
    a flip or rotation of the image flips or swaps the row and column offsets."""
    if probs.shape[1] != 5 or k == 0:
        return probs
    offsets = torch.einsum("ij,njhw->nihw", offset_turn(k), probs[:, 3:] * 2 - 1)
    return torch.cat([probs[:, :3], (offsets + 1) / 2], dim=1)


@functools.cache
def offset_turn(k: int) -> Tensor:
    """The 2x2 signed permutation taking (row, column) offsets seen after ``dihedral(., k)``
    back to the image's own axes, read off ``dihedral`` applied to a coordinate grid."""
    r = torch.arange(3.0) - 1
    grid = torch.stack(torch.meshgrid(r, r, indexing="ij"))[None]  # row, column coordinates
    back = dihedral(grid, k)[0]  # at each new position, its old coordinates
    return torch.stack([back[:, 2, 1], back[:, 1, 2]], dim=1)  # old from new: (row, col) x2


def predict_batch(model: nn.Module, x: Tensor, tta: bool = False) -> Tensor:
    """Sigmoid probabilities of a batch, averaged over the 8 flips/rotations with ``tta``."""
    if not tta:
        return torch.sigmoid(model(x).float())
    total = torch.zeros(())
    for k in range(8):
        probs = undo_dihedral(torch.sigmoid(model(dihedral(x, k)).float()), k)
        total = total + turn_offsets(probs, k)
    return total / 8


def tile_layout(
    length: int, tile: int, overlap: int, multiple: int
) -> tuple[int, list[int]]:
    """Tile length and start offsets covering ``length`` with at least ``overlap`` shared pixels.

    As few tiles as ``tile`` allows, shrunk (to a ``multiple``, the network's) and spread evenly,
    so the image is covered barely more than once: a 2048-pixel side takes three 704-pixel
    tiles, not five 512-pixel ones.
    """
    if length <= tile:
        return length, [0]
    n = math.ceil((length - overlap) / (tile - overlap))
    size = min(tile, math.ceil((length + (n - 1) * overlap) / n / multiple) * multiple)
    return size, [round(i * (length - size) / (n - 1)) for i in range(n)]


def ramp(size: int, overlap: int) -> Tensor:
    """A 1-D blending weight: a raised-cosine ramp over ``overlap`` pixels at each end, 1 inside.

    Where two tiles overlap, one fades out as the other fades in, so tile edges (where the
    network lacks context) count least and no seam is visible.
    """
    i = torch.arange(size, dtype=torch.float32)
    edge = torch.minimum(i + 0.5, size - i - 0.5) / max(overlap, 1)
    return torch.sin(torch.pi / 2 * edge.clamp(max=1)) ** 2 + 1e-4


def network_device(model: nn.Module) -> torch.device:
    """The device of a module's parameters (CPU for a callable without any)."""
    param = next(iter(model.parameters()), None) if isinstance(model, nn.Module) else None
    return param.device if param is not None else torch.device("cpu")


def network_multiple(model: nn.Module) -> int:
    """The size multiple of a ``UNet`` or of a module holding one as ``net``."""
    net = getattr(model, "net", model)
    multiple = getattr(model, "multiple", None) or getattr(net, "multiple", None)
    if not multiple:
        raise ValueError(f"{type(model).__name__} has no size multiple: pass multiple=")
    return multiple


@torch.no_grad()
def predict_tensor(
    model: nn.Module,
    image: Tensor,
    tile_size: int = 1024,
    overlap: int = 32,
    batch_size: int = 1,
    tta: bool = False,
    multiple: int | None = None,
    device: str | torch.device | None = None,
) -> Tensor:
    """Probabilities (K, H, W) in CPU memory for one (C, H, W) image of any size.

    The image is reflect-padded to ``multiple`` (the network's size multiple; by default the
    model's ``multiple`` or ``net.multiple``, to be given for other callables); above
    ``tile_size`` it is cut into tiles that share ``overlap`` pixels, predicted ``batch_size``
    tiles at a time and blended with a ramp, so memory depends on the tile size, not on the
    image size. Tiles are sent to ``device`` (default: the model's) and the result is gathered
    on the CPU, so every path returns CPU memory.
    """
    multiple = multiple or network_multiple(model)
    if tile_size % multiple:
        raise UserError(
            f"inference.tile_size={tile_size} must be a multiple of {multiple}, the network's"
        )
    if not 0 <= overlap < tile_size // 2:
        raise UserError(f"overlap={overlap} must be >= 0 and below half of tile_size")
    device = torch.device(device) if device is not None else network_device(model)
    c, h, w = image.shape
    x = image[None]
    if h % multiple or w % multiple:  # a copy only where padding is needed
        mode = "reflect" if min(h, w) > multiple else "replicate"
        x = F.pad(x, (0, -w % multiple, 0, -h % multiple), mode=mode)
    ph, pw = x.shape[-2:]
    if ph <= tile_size and pw <= tile_size:
        return predict_batch(model, x.to(device), tta)[0, :, :h, :w].cpu()
    (th, ys) = tile_layout(ph, tile_size, overlap, multiple)
    (tw, xs) = tile_layout(pw, tile_size, overlap, multiple)
    weight = ramp(th, overlap)[:, None] * ramp(tw, overlap)[None, :]
    positions = [(y, xx) for y in ys for xx in xs]
    total, out_weight = None, torch.zeros(ph, pw)
    for i in range(0, len(positions), batch_size):
        chunk = positions[i : i + batch_size]
        batch = torch.cat([x[..., y : y + th, xx : xx + tw] for y, xx in chunk])
        probs = predict_batch(model, batch.to(device), tta)
        if total is None:
            total = torch.zeros(probs.shape[1], ph, pw)
        for (y, xx), p in zip(chunk, probs.cpu(), strict=True):
            total[:, y : y + th, xx : xx + tw].addcmul_(p, weight)
            out_weight[y : y + th, xx : xx + tw] += weight
    return total.div_(out_weight)[:, :h, :w]


def resize_shape(h: int, w: int, img_size: int, max_squash: float) -> tuple[int, int]:
    """The size a resize-mode model predicts an h x w image at.

    Images up to ``max_squash`` times longer than wide are resized to img_size x img_size, as
    the training images were; longer ones keep their aspect ratio, scaled so the short side is
    img_size (the scale such an image would have had in training), and are tiled: squashing
    a 5000 x 300 strip to 64 x 64 would shrink its nuclei 80-fold along one axis.
    """
    if max(h, w) <= max_squash * min(h, w):
        return img_size, img_size
    scale = img_size / min(h, w)
    return max(img_size, round(h * scale)), max(img_size, round(w * scale))


SHRINK_WARNING = 8.0  # a resize-mode model shrinking an image more than this: said in the log


def check_shrink(h: int, w: int, img_size: int, max_shrink: float) -> None:
    """Refuse (above ``max_shrink``) or warn (above ``SHRINK_WARNING``) when a model trained on
    images resized to ``img_size`` would shrink an ``h`` x ``w`` image by a large factor."""
    from cellseg.files import ImageFileError

    shrink = min(h, w) / img_size
    advice = (f"this model was trained on images resized to {img_size}x{img_size} and would "
              f"shrink this {h}x{w} image {shrink:.0f} times, its nuclei to a few pixels; use a "
              "native-resolution model (the shipped one: leave model= out)")
    if shrink > max_shrink:
        raise ImageFileError(f"{advice}, or raise inference.max_shrink={max_shrink:g} to "
                             "segment it anyway")
    if shrink > SHRINK_WARNING:
        log.warning(advice)


def predict_image(
    model: nn.Module,
    image: np.ndarray,
    mode: str = "crop",
    img_size: int = 64,
    max_squash: float = 2.0,
    max_shrink: float = 20.0,
    **kwargs,
) -> np.ndarray:
    """Probabilities (H, W, K) for a prepared (H, W, C) float image at its own size.

    A model trained in ``resize`` mode predicts at its training scale (see
    :func:`resize_shape`) and the result is resized back to the image's size; ``crop``-mode
    models predict natively. ``kwargs`` go to :func:`predict_tensor`. A resize-mode model
    refuses an image it would shrink more than ``max_shrink`` times (its nuclei would become
    blobs of a few pixels) and warns from ``SHRINK_WARNING`` times on.
    """
    h, w = image.shape[:2]
    if mode == "resize":
        check_shrink(h, w, img_size, max_shrink)
        shape = resize_shape(h, w, img_size, max_squash)
        if shape != (img_size, img_size):
            log.info(
                "a %dx%d image is more than %g times longer than wide: predicted at %dx%d "
                "(aspect ratio kept), not squashed to %dx%d", h, w, max_squash, *shape,
                img_size, img_size,
            )
        image = resize(image, shape)
    x = torch.from_numpy(image).permute(2, 0, 1)  # a view: tiles are copied one by one
    probs = predict_tensor(model, x, **kwargs).numpy().transpose(1, 2, 0)
    if mode == "resize":
        probs = resize(probs, (h, w), "linear")
    return probs


def probabilities(
    model: nn.Module, image: np.ndarray, preprocess: dict, inference: dict
) -> np.ndarray:
    """Probabilities (H, W, K) in CPU memory of a stored image at its own size, prepared as
    ``preprocess``; images smaller than the network's size multiple are refused."""
    multiple = preprocess["multiple"]
    if min(image.shape[:2]) < multiple:
        raise UserError(
            f"the image is {image.shape[0]}x{image.shape[1]} pixels, smaller than the network's "
            f"size multiple {multiple}: too small to segment"
        )
    x = prepare_image(
        image, preprocess["in_channels"], preprocess["normalize"], preprocess["invert_bright"],
        preprocess.get("intensity"),
    )
    return predict_image(
        model, x, preprocess["mode"], preprocess["img_size"], multiple=multiple, **inference
    )


def segment(
    model: nn.Module, image: np.ndarray, preprocess: dict, inference: dict, instances_cfg: dict
) -> tuple[np.ndarray, np.ndarray]:
    """Foreground probabilities (H, W) and instance labels of a stored image at its own size,
    both numpy arrays in CPU memory whatever the model's device."""
    probs = probabilities(model, image, preprocess, inference)
    return probs[..., 0], labels_from_probs(probs, **instances_cfg)


AUTO_PASSES = 3  # segmentations at most to estimate the nuclei's size (diameter=auto)
# the factors (training size / nuclei found) within which an image is segmented as it is: the
# recipes train on a 0.5-2x zoom, weaker at its small end (few pixels a nucleus), so nuclei are
# enlarged from 1.5x on, shrunk from 2x; chosen on the shipped model's validation images at 0.5x,
# 1x and 2x (docs/model.md#any-magnification)
AUTO_BAND = (0.5, 1.5)
AUTO_AGREE = 1.2  # two passes whose estimates agree within this factor: the estimate has settled


ESTIMATE_SIDE = 1024  # px the network sees at most per side in a size-estimating pass


def centre(image: np.ndarray, side: int) -> np.ndarray:
    """The centre of an image, at most ``side`` pixels a side (a view)."""
    h, w = image.shape[:2]
    y, x = max(0, (h - side) // 2), max(0, (w - side) // 2)
    return image[y : y + side, x : x + side]


def auto_diameter(preprocess: dict, quiet: bool = False) -> bool:
    """Whether ``diameter=auto`` can estimate sizes for this model: it needs a model trained at
    native resolution that records its training nuclei's diameter (said once, when it cannot)."""
    ok = preprocess["mode"] == "crop" and bool(preprocess.get("diameter"))
    if not ok and not quiet:
        log.info("diameter=auto: this model %s, so images are segmented as they are",
                 "resizes every image" if preprocess["mode"] == "resize"
                 else "records no training nucleus diameter")
    return ok


def estimate_diameter(
    model: nn.Module, image: np.ndarray, preprocess: dict, inference: dict, instances_cfg: dict,
    passes: list | None = None,
) -> float | None:
    """The median equivalent diameter (px) of the nuclei in ``image``, as the model finds them:
    segmented as it is, then, unless the nuclei found are a size it segments well as they are
    (``AUTO_BAND``), again rescaled so that nuclei of the size found appear at the training
    size, until two passes agree within ``AUTO_AGREE`` (nuclei far from the training size come
    out in pieces or merged; within the band they do not). Each pass sees the image's
    centre, at most ``ESTIMATE_SIDE`` px a side at the network: a bounded cost on any image.
    None: no nuclei found. ``passes`` (a list) receives (scale, foreground, labels) of each pass
    that saw the whole image, for the caller to reuse."""
    from cellseg.measure import median_diameter

    scale, diameter = 1.0, None
    quick = {**inference, "tta": False}
    for _ in range(AUTO_PASSES):  # on the centre of a large image: at most 1024 px a side seen
        view = centre(image, max(round(ESTIMATE_SIDE / scale), preprocess["multiple"]))
        foreground, labels = segment_rescaled(model, view, preprocess, quick, instances_cfg,
                                              scale)
        if passes is not None and view.shape[:2] == image.shape[:2]:
            passes.append((scale, foreground, labels))
        found = median_diameter([labels])
        if found is None:
            return diameter
        diameter, new = found, reachable_scale(preprocess, image.shape, found)
        settled = abs(math.log(new / scale)) < math.log(AUTO_AGREE)
        as_it_is = scale == 1.0 and in_band(new)
        if settled or as_it_is:  # nuclei of a size the network segments well: found whole
            break
        scale = new
    return diameter


def reachable_scale(preprocess: dict, shape: tuple[int, ...], diameter: float) -> float:
    """The factor that brings nuclei of ``diameter`` px to the training size, within 0.1-4x and
    keeping the image at least one network input (the multiple) a side."""
    smallest = preprocess["multiple"] / min(shape[:2])
    return float(np.clip(float(preprocess["diameter"]) / diameter, max(0.1, smallest), 4.0))


def diameter_scale(preprocess: dict, diameter: Any, quiet: bool = False) -> float | None:
    """The factor that brings nuclei of ``diameter`` px to the training nuclei's median size
    (None without ``diameter``); refused with the reason for values or models it cannot serve.
    ``auto``: checked here, estimated per image by :func:`segment_at_scale`."""
    if diameter is None:
        return None
    if diameter == "auto":
        auto_diameter(preprocess, quiet)
        return None
    try:
        diameter = float(diameter)
    except (TypeError, ValueError):
        raise UserError(f"diameter={diameter!r}: give the nuclei's diameter in pixels") from None
    if not diameter > 0:
        raise UserError(f"diameter={diameter:g}: give the nuclei's diameter in pixels, above 0")
    if preprocess["mode"] == "resize":
        raise UserError(
            f"diameter={diameter:g}: this model resizes every image to {preprocess['img_size']}"
            f"x{preprocess['img_size']}, whatever its nuclei's size; diameter= serves models "
            "trained at native resolution (experiment=native, data.mode=crop)"
        )
    trained = preprocess.get("diameter")
    if not trained:
        raise UserError(
            f"diameter={diameter:g}: the checkpoint records no nucleus diameter of its training "
            "data; retrain with this version, or leave diameter unset"
        )
    scale = float(trained) / diameter
    if not quiet:
        log.info("diameter=%g: images rescaled by %.3g (the training nuclei's median %.1f px / "
                 "%g px) and the labels mapped back", diameter, scale, trained, diameter)
    return scale


def segment_at_scale(
    model: nn.Module,
    image: np.ndarray,
    preprocess: dict,
    inference: dict,
    instances_cfg: dict,
    diameter: float | None = None,
    name: str = "",
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`segment` with the image rescaled so that nuclei of ``diameter`` pixels appear at
    the training data's median diameter (``preprocess["diameter"]``); the probabilities and
    labels are mapped back to the image's own pixel grid (labels nearest). ``auto``: the
    diameter estimated (:func:`choose_scale`, its log line led by ``name``); where the image
    is then segmented at the scale of an estimating pass that saw all of it, that pass's
    result is the result (the same computation: an image within ``AUTO_BAND`` is segmented
    once, a rescaled one twice)."""
    passes: list = []
    scale, _ = choose_scale(model, image, preprocess, inference, instances_cfg, diameter,
                            passes=passes, name=name)
    for seen, foreground, labels in passes:
        if seen == (scale or 1.0) and not inference.get("tta"):
            return foreground, labels
    return segment_rescaled(model, image, preprocess, inference, instances_cfg, scale)


def choose_scale(
    model: nn.Module, image: np.ndarray, preprocess: dict, inference: dict,
    instances_cfg: dict, diameter: Any, shape: tuple[int, ...] | None = None,
    passes: list | None = None, name: str = "",
) -> tuple[float | None, float | None]:
    """The factor to rescale an image of ``shape`` (default: ``image``'s) by, and the nuclei's
    diameter in its pixels (given, or None where unknown). ``auto``: estimated on ``image``
    (:func:`estimate_diameter`, logged with ``name`` in front: images run side by side;
    ``passes`` as there), None (as it is) where the factor is within ``AUTO_BAND``; the scale
    of the last pass that saw the whole image where the estimate settled there (within
    ``AUTO_AGREE``: segmenting again at the last estimate's own scale, a few per cent away,
    would repeat that pass)."""
    shape = shape or image.shape
    if diameter != "auto":
        scale = diameter_scale(preprocess, diameter, quiet=True)
        given = float(diameter) if diameter is not None else None
        return scale, given or preprocess.get("diameter")
    scale = found = None
    if auto_diameter(preprocess, quiet=True):
        found = estimate_diameter(model, image, preprocess, inference, instances_cfg, passes)
        wanted = None
        if found is not None:
            wanted = reachable_scale(preprocess, shape, found)
            scale = None if in_band(wanted) else settled_scale(wanted, passes or [])
        log.info("%snuclei about %s px across (diameter=auto): %s", f"{name}: " if name else "",
                 f"{found:.1f}" if found else "?", scale_text(scale, wanted))
    return scale, found or preprocess.get("diameter")


def scale_text(scale: float | None, wanted: float | None) -> str:
    """How an image is segmented, for the log: the estimate's own factor beside the one used
    where a pass at a factor within ``AUTO_AGREE`` of it already saw the image."""
    if not scale:
        return "as it is"
    if wanted and abs(scale - wanted) > 5e-3 * wanted:
        return f"rescaled by {scale:.3g} (the pass at that scale; the estimate asks {wanted:.3g})"
    return f"rescaled by {scale:.3g}"


def in_band(scale: float) -> bool:
    """Whether an image needing ``scale`` to bring its nuclei to the training size is
    segmented as it is (``AUTO_BAND``)."""
    return AUTO_BAND[0] < scale < AUTO_BAND[1]


def settled_scale(scale: float, passes: list) -> float:
    """The scale of the last of ``passes`` where it was rescaled and ``scale`` agrees with it
    within ``AUTO_AGREE`` (the estimate settled there), else ``scale``."""
    seen = passes[-1][0] if passes else 1.0
    agrees = abs(math.log(scale / seen)) < math.log(AUTO_AGREE)
    return seen if seen != 1.0 and agrees else scale


def segment_rescaled(
    model: nn.Module, image: np.ndarray, preprocess: dict, inference: dict,
    instances_cfg: dict, scale: float | None,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`segment` of the image resized by ``scale`` (None or 1: as it is), the results
    mapped back to the image's own pixel grid: the probabilities averaged over each pixel (from
    an enlarged image) or interpolated (from a shrunk one), and the nuclei outlined where they
    pass the threshold; a pixel's nearest sample decides only which nucleus it belongs to."""
    if scale is None or scale == 1.0:
        return segment(model, image, preprocess, inference, instances_cfg)
    h, w = image.shape[:2]
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    # enlarged cubic, sharper than linear: small nuclei segmented better (docs/model.md)
    scaled = resize(image, size, "area" if scale < 1 else "cubic")
    foreground, labels = segment(model, scaled, preprocess, inference, instances_cfg)
    foreground = resize(foreground, (h, w), "area" if scale > 1 else "linear")
    threshold = instances_cfg.get("threshold")
    threshold = THRESHOLD if threshold is None else threshold
    reach = max(2, math.ceil(round(1 / scale, 6)))  # px between a nucleus's blocks and its outline
    return foreground, labels_within(resize(labels, (h, w), "nearest"), foreground > threshold,
                                     reach)
