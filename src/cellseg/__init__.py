"""cellseg: nucleus segmentation with a U-Net, PyTorch Lightning and Hydra."""

import os
import re
from pathlib import Path

# albumentations otherwise asks the network for a newer release on every import
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from omegaconf import OmegaConf

__version__ = "0.1.0"

# ${cwd:} in configs: the directory cellseg was started from (also where Hydra's own
# ${hydra:runtime.cwd} is not yet set, e.g. while it resolves a sweep directory)
OmegaConf.register_new_resolver("cwd", os.getcwd, replace=True)


def run_name(name: str, layout: str = "", root: str = "", overrides: str = "") -> str:
    """A run folder's name: the experiment, the data unless it is the default synthetic set
    (the folder's own name for ``data=folder``), and the overrides that distinguish the run
    (``model.loss=dice_bce,seed=1`` written ``model.loss-dice_bce+seed-1``: a path a Hydra
    override such as ``ckpt_path=<run>/...`` accepts without quotes)."""
    data = Path(root).name if layout == "folder" else layout
    overrides = ",".join(map(short_override, overrides.split(",")) if overrides else "")
    overrides = overrides.replace("=", "-").replace(",", "+")
    parts = [name, "" if data in ("synthetic", name) else data, overrides]
    return re.sub(r"[^\w.+@%-]", "", "_".join(p for p in parts if p))[:200]


def short_override(item: str) -> str:
    """An override as a run name shows it: a path by what names it (a checkpoint by its run
    folder, another file by its name), and ``model_name`` as typed, ``model``."""
    key, sep, value = item.partition("=")
    if "/" in value:
        path = Path(value)
        value = path.parents[1].name if path.parent.name == "checkpoints" else path.name
    return f"{'model' if key == 'model_name' else key}{sep}{value}"


OmegaConf.register_new_resolver("run_name", run_name, replace=True)


def config_dir() -> str:
    """The Hydra config folder: inside the installed package, or ``configs/`` of a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "configs", here.parents[1] / "configs"):
        if (candidate / "train.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"cellseg's configs/ not found beside {here}; reinstall cellseg")
