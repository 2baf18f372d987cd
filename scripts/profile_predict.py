"""Where each second of ``python -m cellseg.predict`` goes, image by image (issue 33).

    python scripts/profile_predict.py INPUT_DIR [N_IMAGES] [predict overrides ...]

Copies the first ``N_IMAGES`` (default 60) images of INPUT_DIR (a flat folder, or the
dsb2018-pool's ``images/``) to a temporary folder, runs ``predict`` on them under cProfile with
the given overrides (default: the shipped model, default outputs) and prints the seconds of each
stage (the cumulative time of the functions that do it), its share, and the end-to-end
megapixels/s next to the bare forward pass's (the network alone on the same pixels).
"""

from __future__ import annotations

import cProfile
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir
from PIL import Image

from cellseg import config_dir
from cellseg.bench import bare_forward_mpx_s
from cellseg.predict import find_inputs, predict

STAGES = {  # stage: (module file, function) whose cumulative time is the stage's
    "diameter=auto estimate": ("inference.py", "estimate_diameter"),
    "network (tiles, blending)": ("inference.py", "predict_tensor"),
    "reading files": ("files.py", "open_image"),
    "reading planes": ("files.py", "region"),
    "normalising": ("datasets.py", "prepare_image"),
    "instances (watershed, seeds)": ("instances.py", "labels_from_probs"),
    "measurements": ("measure.py", "measure"),
    "overlays": ("predict.py", "overlay"),
    "writing PNGs": ("files.py", "save_png"),
    "tables, submission (merge)": ("predict.py", "merge"),
}


def stage_seconds(stats: pstats.Stats) -> dict[str, float]:
    found = dict.fromkeys(STAGES, 0.0)
    for (path, _, name), (_, _, _, cumulative, _) in stats.stats.items():
        for stage, (file, function) in STAGES.items():
            if path.endswith(file) and name == function:
                found[stage] += cumulative
    return found


def main() -> None:
    source, n = Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 60
    overrides = sys.argv[3:]
    folder = source / "images" if (source / "images").is_dir() else source
    paths = sorted(find_inputs(folder).values())[:n]
    work = Path(tempfile.mkdtemp())
    (work / "in").mkdir()
    for path in paths:
        shutil.copy(path, work / "in" / path.name)
    megapixels = sum(np.prod(Image.open(p).size) for p in paths) / 1e6
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("predict", [f"input={work / 'in'}", f"output={work / 'out'}", *overrides])
    profile = cProfile.Profile()
    start = time.perf_counter()
    profile.runcall(predict, cfg)
    total = time.perf_counter() - start
    stages = stage_seconds(pstats.Stats(profile))
    print(f"{len(paths)} images, {megapixels:.1f} MP, {total:.1f} s: "
          f"{megapixels / total:.2f} MP/s end to end ({' '.join(overrides) or 'defaults'})")
    print("| stage | seconds | share |\n|---|---|---|")
    for stage, seconds in stages.items():
        print(f"| {stage} | {seconds:.1f} | {seconds / total:.0%} |")
    bare = bare_forward_mpx_s(paths)
    print(f"bare forward: {bare:.2f} MP/s; end to end / bare = {megapixels / total / bare:.2f}")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
