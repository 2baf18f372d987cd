"""cellseg: nucleus segmentation with a U-Net, PyTorch Lightning and Hydra."""

import os
from pathlib import Path

# albumentations otherwise asks the network for a newer release on every import
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"


def config_dir() -> str:
    """The Hydra config folder: inside the installed package, or ``configs/`` of a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "configs", here.parents[1] / "configs"):
        if (candidate / "train.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"cellseg's configs/ not found beside {here}; reinstall cellseg")
