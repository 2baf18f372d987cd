"""Image grids: samples with their masks (the study's figure 3) and image/mask/prediction rows
(its figure 11), as CHW tensors for TensorBoard."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from cellseg.datasets import normalize, to_channels


def display_rgb(image: np.ndarray) -> np.ndarray:
    """A stored image of any depth and channel count as 8-bit RGB for viewing."""
    return (normalize(to_channels(image, 3), "percentile") * 255).astype(np.uint8)


def to_rgb(image: Tensor) -> Tensor:
    """A (C, H, W) image in [0, 1] as 3-channel RGB (grayscale repeated)."""
    image = image.detach().float().cpu().clamp(0, 1)
    return image.expand(3, -1, -1) if image.shape[0] == 1 else image[:3]


def rows_grid(rows: Sequence[Sequence[Tensor]], padding: int = 2) -> Tensor:
    """One (3, H', W') grid whose rows are the given lists of equally sized images."""
    ncol = len(rows[0])
    if any(len(r) != ncol for r in rows):
        raise ValueError("every row of an image grid needs the same number of images")
    # torchvision costs 160 MB: imported where a grid is drawn, not by predict
    from torchvision.utils import make_grid

    tiles = [to_rgb(t) for row in rows for t in row]
    return make_grid(torch.stack(tiles), nrow=ncol, padding=padding, pad_value=1.0)
