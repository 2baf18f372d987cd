"""A real nucleus image that ships with cellseg, to try a model with no data of one's own.

``nuclei.png``: 256x256 8-bit fluorescence (DAPI-like) nuclei, image
c75139ef0546d2240b37afb3219eb74a06b7977818697d5c3138796472483af3 of the 2018 Data Science Bowl
stage1_train set (BBBC038, CC0; Caicedo et al., Nature Methods 16, 1247-1253, 2019), one of the
10 images the shipped model is tested on (never trained on); ``nuclei_labels.png``: its 89
annotated nuclei as 16-bit instance labels.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).parent
SAMPLES = {"nuclei": "nuclei.png"}


def sample_path(name: str = "nuclei") -> Path:
    """The file of a sample image."""
    return HERE / SAMPLES[name]


def sample_labels_path(name: str = "nuclei") -> Path:
    """The annotated instance labels of a sample image."""
    return HERE / SAMPLES[name].replace(".png", "_labels.png")
