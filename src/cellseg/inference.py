"""Whole-image prediction at any size: padding, overlapping tiles, test-time augmentation."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cellseg.datasets import prepare_image, resize
from cellseg.instances import labels_from_probs
from cellseg.module import SegmentationModule

MULTIPLE = 16


def dihedral(x: Tensor, k: int) -> Tensor:
    """The k-th of the 8 flips/rotations of (N, C, H, W) tensors (k = 0 is the identity)."""
    x = torch.rot90(x, k % 4, dims=(-2, -1))
    return torch.flip(x, dims=(-1,)) if k >= 4 else x


def undo_dihedral(x: Tensor, k: int) -> Tensor:
    """The inverse of :func:`dihedral`."""
    x = torch.flip(x, dims=(-1,)) if k >= 4 else x
    return torch.rot90(x, -(k % 4), dims=(-2, -1))


def predict_batch(model: nn.Module, x: Tensor, tta: bool = False) -> Tensor:
    """Sigmoid probabilities of a batch, averaged over the 8 flips/rotations with ``tta``."""
    if not tta:
        return torch.sigmoid(model(x).float())
    total = torch.zeros(())
    for k in range(8):
        total = total + undo_dihedral(torch.sigmoid(model(dihedral(x, k)).float()), k)
    return total / 8


def tile_layout(length: int, tile: int, overlap: int) -> tuple[int, list[int]]:
    """Tile length and start offsets covering ``length`` with at least ``overlap`` shared pixels.

    As few tiles as ``tile`` allows, shrunk (to a multiple of 16) and spread evenly, so the
    image is covered barely more than once: a 2048-pixel side takes three 704-pixel tiles, not
    five 512-pixel ones.
    """
    if length <= tile:
        return length, [0]
    n = math.ceil((length - overlap) / (tile - overlap))
    size = min(tile, math.ceil((length + (n - 1) * overlap) / n / MULTIPLE) * MULTIPLE)
    return size, [round(i * (length - size) / (n - 1)) for i in range(n)]


def ramp(size: int, overlap: int) -> Tensor:
    """A 1-D blending weight: a raised-cosine ramp over ``overlap`` pixels at each end, 1 inside.

    Where two tiles overlap, one fades out as the other fades in, so tile edges (where the
    network lacks context) count least and no seam is visible.
    """
    i = torch.arange(size, dtype=torch.float32)
    edge = torch.minimum(i + 0.5, size - i - 0.5) / max(overlap, 1)
    return torch.sin(torch.pi / 2 * edge.clamp(max=1)) ** 2 + 1e-4


@torch.no_grad()
def predict_tensor(
    model: nn.Module,
    image: Tensor,
    tile_size: int = 1024,
    overlap: int = 32,
    batch_size: int = 1,
    tta: bool = False,
) -> Tensor:
    """Probabilities (K, H, W) for one (C, H, W) image of any size.

    The image is reflect-padded to a multiple of 16; above ``tile_size`` it is cut into tiles
    that share ``overlap`` pixels, predicted ``batch_size`` tiles at a time and blended with a
    ramp, so memory depends on the tile size, not on the image size.
    """
    if tile_size % MULTIPLE:
        raise ValueError(f"tile_size={tile_size} must be a multiple of {MULTIPLE}")
    if not 0 <= overlap < tile_size // 2:
        raise ValueError(f"overlap={overlap} must be >= 0 and below half of tile_size")
    c, h, w = image.shape
    x = image[None]
    if h % MULTIPLE or w % MULTIPLE:  # a copy only where padding is needed
        mode = "reflect" if min(h, w) > MULTIPLE else "replicate"
        x = F.pad(x, (0, -w % MULTIPLE, 0, -h % MULTIPLE), mode=mode)
    ph, pw = x.shape[-2:]
    if ph <= tile_size and pw <= tile_size:
        return predict_batch(model, x, tta)[0, :, :h, :w]
    (th, ys), (tw, xs) = tile_layout(ph, tile_size, overlap), tile_layout(pw, tile_size, overlap)
    weight = ramp(th, overlap)[:, None] * ramp(tw, overlap)[None, :]
    positions = [(y, xx) for y in ys for xx in xs]
    total, out_weight = None, torch.zeros(ph, pw)
    for i in range(0, len(positions), batch_size):
        chunk = positions[i : i + batch_size]
        batch = torch.cat([x[..., y : y + th, xx : xx + tw] for y, xx in chunk])
        probs = predict_batch(model, batch, tta)
        if total is None:
            total = torch.zeros(probs.shape[1], ph, pw)
        for (y, xx), p in zip(chunk, probs.cpu(), strict=True):
            total[:, y : y + th, xx : xx + tw].addcmul_(p, weight)
            out_weight[y : y + th, xx : xx + tw] += weight
    return total.div_(out_weight)[:, :h, :w]


def predict_image(
    model: nn.Module,
    image: np.ndarray,
    mode: str = "crop",
    img_size: int = 64,
    device: str | torch.device = "cpu",
    **kwargs,
) -> np.ndarray:
    """Probabilities (H, W, K) for a prepared (H, W, C) float image at its own size.

    A model trained in ``resize`` mode predicts at its training scale (``img_size``) and the
    result is resized back to the image's size; ``crop``-mode models predict natively.
    """
    h, w = image.shape[:2]
    if mode == "resize":
        image = resize(image, img_size)
    x = torch.from_numpy(image).permute(2, 0, 1).to(device)  # a view: tiles are copied one by one
    probs = predict_tensor(model, x, **kwargs).numpy().transpose(1, 2, 0)
    if mode == "resize":
        probs = resize(probs, (h, w), "linear")
    return probs


def load_model(ckpt_path: str, device: str | torch.device = "cpu") -> nn.Module:
    """A trained ``SegmentationModule`` in eval mode; errors name the file and the fix."""
    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist; pass ckpt_path=<run>/checkpoints/last.ckpt"
        )
    try:
        model = SegmentationModule.load_from_checkpoint(
            path, map_location=device, weights_only=True
        )
    except Exception as err:  # torch/pickle/zip errors say little about what to do
        raise ValueError(
            f"{path} is not a cellseg checkpoint ({type(err).__name__}: {err}); "
            "pass a .ckpt written by python -m cellseg.train"
        ) from err
    return model.eval()


def preprocessing(model: nn.Module, override: dict | None = None) -> dict:
    """How to prepare images for this model: ``override`` if given, else the checkpoint's."""
    pre = override or model.hparams.get("preprocess")
    if not pre:
        raise ValueError(
            "the checkpoint records no preprocessing; pass it, e.g. 'preprocess={mode: resize, "
            "img_size: 64, in_channels: 3, normalize: percentile, invert_bright: false}'"
        )
    return dict(pre)


def probabilities(
    model: nn.Module, image: np.ndarray, preprocess: dict, inference: dict
) -> np.ndarray:
    """Probabilities (H, W, K) of a stored image at its own size, prepared as ``preprocess``."""
    x = prepare_image(
        image, preprocess["in_channels"], preprocess["normalize"], preprocess["invert_bright"]
    )
    return predict_image(model, x, preprocess["mode"], preprocess["img_size"], **inference)


def segment(
    model: nn.Module, image: np.ndarray, preprocess: dict, inference: dict, instances_cfg: dict
) -> tuple[np.ndarray, np.ndarray]:
    """Foreground probabilities (H, W) and instance labels of a stored image at its own size."""
    probs = probabilities(model, image, preprocess, inference)
    return probs[..., 0], labels_from_probs(probs, **instances_cfg)
