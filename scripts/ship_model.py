"""Turn a finished ``experiment=general`` run into the model that ships with cellseg.

    python scripts/ship_model.py RUN_DIR [NAME]      (make model runs it after training)
    python scripts/ship_model.py src/cellseg/models/nuclei.pth   (scores again, weights kept)

Scores the run's last checkpoint (or a shipped model file again, when prediction's defaults
changed) on its test images (the sample's 10) with the diameter estimated (the default) and
with the images as they are, then writes
``src/cellseg/models/NAME.pth`` (NAME: nuclei): the weights, the network and data description,
the tuned post-processing, and under ``cellseg``: the format version, the commit and command
that trained it, a hash of its training ids and its scores. Optimizer and loop states are
dropped (the file is for predicting and fine-tuning, not for resuming). A network too wide for
the 10 MB in float32 is stored with float16 weights, and the scores are those of the file.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import torch

from cellseg.checkpoint import read, weights_in_half
from cellseg.eval import evaluate_with

KEEP = ("state_dict", "hyper_parameters", "datamodule_hyper_parameters", "NucleiDataModule",
        "postprocess", "cellseg", "epoch", "global_step", "pytorch-lightning_version")
MAX_BYTES = 10 * 2**20  # what a shipped model may weigh
SCORES = ("iou", "iou_nuclei", "map", "ap50", "ap50_pooled", "map_pooled")


def ids_hash(ids: list[str]) -> str:
    """sha256 of the sorted ids, one a line: the same training images give the same hash."""
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()


def test_scores(ckpt: Path, diameter: str) -> dict[str, float]:
    """The checkpoint's scores on its test split (as ``python -m cellseg.eval`` computes them)."""
    metrics, _ = evaluate_with([f"model_name={ckpt}", f"diameter={diameter}"])
    return {k: round(metrics[k], 4) for k in SCORES}


def check_finished(checkpoint: dict, ckpt: Path) -> None:
    """Refuse a run that did not reach its end: the post-processing is tuned only after the
    last epoch, so a run stopped early (a signal, a crash) has none."""
    if not checkpoint.get("postprocess"):
        raise SystemExit(
            f"{ckpt} is not a finished run (stopped after epoch {checkpoint.get('epoch', -1) + 1}, "
            f"its post-processing never tuned): finish it with its command and "
            f"ckpt_path={ckpt}, then ship it"
        )


def main(source: str, name: str | None = None) -> Path:
    ckpt = Path(source) if Path(source).is_file() else Path(source) / "checkpoints/last.ckpt"
    name = name or (ckpt.stem if ckpt.suffix == ".pth" else "nuclei")
    checkpoint = read(ckpt)
    check_finished(checkpoint, ckpt)
    slim = {k: checkpoint[k] for k in KEEP if k in checkpoint}
    out = Path(__file__).resolve().parents[1] / "src/cellseg/models" / f"{name}.pth"
    torch.save(slim, out)
    if out.stat().st_size > MAX_BYTES:  # a wider network: its weights in float16
        slim = weights_in_half(slim)
        torch.save(slim, out)
    size = out.stat().st_size / 2**20
    if out.stat().st_size > MAX_BYTES:
        raise SystemExit(f"{out} is {size:.1f} MB, over the 10 MB a shipped model may take")
    splits = checkpoint["NucleiDataModule"]["splits"]
    tuned = checkpoint.get("postprocess") or {}
    slim["cellseg"] = {  # the file's own scores: float16 weights, if stored so, included
        **checkpoint.get("cellseg", {}),
        "name": name,
        "train_ids_sha256": ids_hash(splits["train"]),
        "images": {k: len(v) for k, v in splits.items()},
        "scores": {
            "test": test_scores(out, "auto"),
            "test_as_they_are": test_scores(out, "null"),
            f"val_{tuned.get('score', 'map_pooled')}": tuned.get(tuned.get("score", "")),
        },
    }
    torch.save(slim, out)
    print(f"{out}: {size:.1f} MB, scores {slim['cellseg']['scores']}")
    return out


if __name__ == "__main__":
    if not 2 <= len(sys.argv) <= 3:
        raise SystemExit(__doc__)
    main(*sys.argv[1:])
