"""napari sample data: the real nucleus image that ships with cellseg (CC0)."""

from __future__ import annotations

from cellseg.files import read_image
from cellseg.samples import sample_path


def nuclei() -> list[tuple]:
    """The packaged 256x256 fluorescence image (one of the shipped model's test images)."""
    return [(read_image(sample_path())[..., 0], {"name": "nuclei (cellseg sample)"}, "image")]
