"""The shape measurements' time against ``regionprops`` on real annotations (docs/performance.md).

    python scripts/measure_speed.py [MASKS_DIR] [N_MASKS]

Over the first N_MASKS (default 100) 16-bit label images of MASKS_DIR (default the
dsb2018-pool's ``masks/``), the median of 3 rounds after one warm-up (``cellseg.bench.timed``):
``skimage.measure.regionprops_table`` for the solidity
alone and for every shape property ``cellseg.measure.shape_table`` gives, against
``shape_table``; checks that the values are the same.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image
from skimage.measure import regionprops_table

from cellseg.bench import timed
from cellseg.measure import shape_table

PROPS = ("label", "area", "centroid", "bbox", "eccentricity", "solidity")


def main(masks_dir: str = "../shared/data/dsb2018-pool/masks", n: str = "100") -> None:
    paths = sorted(Path(masks_dir).glob("*.png"))[: int(n)]
    if not paths:
        sys.exit(f"{masks_dir}: no .png label images; name the pool's masks/ folder")
    labels = [np.asarray(Image.open(p)).astype(np.int32) for p in paths]
    for lab in labels:
        ours, theirs = shape_table(lab), regionprops_table(lab, properties=PROPS)
        assert np.array_equal(ours["solidity"], theirs["solidity"]), "solidity differs"
        assert np.allclose(ours["eccentricity"], theirs["eccentricity"], atol=1e-5)
    nuclei = sum(len(np.unique(lab)) - 1 for lab in labels)
    runs = {
        "regionprops, solidity alone": lambda x: regionprops_table(x, properties=("solidity",)),
        "regionprops, the same properties": lambda x: regionprops_table(x, properties=PROPS),
        "cellseg.measure.shape_table": shape_table,
    }
    seconds = timed([lambda run=run: [run(x) for x in labels] for run in runs.values()],
                    warmup=1, repeats=3)
    print(f"{len(labels)} label images, {nuclei} nuclei (median of 3, s):")
    for name, took in zip(runs, seconds, strict=True):
        print(f"{name}: {took:.2f}")


if __name__ == "__main__":
    main(*sys.argv[1:])
