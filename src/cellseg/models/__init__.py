"""The models that ship with cellseg (package data) and the names that call them.

``nuclei``: the general nucleus model (``experiment=general``: 340 DSB 2018 images of every
kind), its model card in ``docs/model.md``; ``python -m cellseg.models`` describes each.
"""

from __future__ import annotations

from pathlib import Path

# name -> file beside this module: a slimmed checkpoint (weights, data description, tuned
# post-processing, provenance; no training state), .pth as PyTorch names saved weights
MODELS = {"nuclei": "nuclei.pth"}
DEFAULT_MODEL = "nuclei"


def shipped_path(name: str) -> Path:
    """The file of a shipped model."""
    path = Path(__file__).parent / MODELS[name]
    if not path.is_file():
        from cellseg.errors import UserError

        raise UserError(
            f"the shipped model {name} is missing from {path.parent} (an incomplete install); "
            "reinstall cellseg, or pass model=<a .ckpt>"
        )
    return path
