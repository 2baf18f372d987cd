"""``python -m cellseg.models``: each shipped model, what it was trained on and its scores."""

from __future__ import annotations

import json

from cellseg import checkpoint
from cellseg.models import MODELS


def main() -> None:
    for name in MODELS:
        model = checkpoint.load(name)
        info = {k: v for k, v in model.info.items() if k != "postprocess"}
        print(f"{name}: {model.path}")
        print(json.dumps({**info, "preprocess": model.preprocessing(),
                          "instances": model.postprocess.get("instances")}, indent=2,
                         default=str))


if __name__ == "__main__":
    main()
