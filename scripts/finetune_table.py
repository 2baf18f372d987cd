"""Fine-tuning measured: the shipped model as it is, fine-tuned on 1, 3 and 10 images of the image
kind it handles worst, and a model trained from scratch on the same images (docs/model.md).

    python scripts/finetune_table.py OUT_DIR [MODEL] [KIND]   (MODEL: nuclei, a .ckpt or .pth)

KIND (stained, brightfield, large, small) measures that kind instead of the worst.

1. The kind (stained, brightfield, large grey field, small grey field) with the lowest mean
   ``map`` over the model's validation images (each image scored as ``cellseg.eval`` does).
2. Held back for scoring: that kind's validation and test images (never trained on).
3. Fine-tuning sets: 1, 3 and 10 images of that kind from the model's training split (drawn
   once, seeded, the smaller sets inside the larger). ``experiment=finetune`` from the model,
   and from scratch (``pretrained=null``) with the recipe's learning rate (1e-3) for the same
   number of steps. Each result scored on the held-back images (``cellseg.eval``, its default
   diameter=auto). Writes OUT_DIR/finetune.md and finetune.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from cellseg import checkpoint
from cellseg.datasets import image_kind, normalize, run_sources, to_channels
from cellseg.eval import evaluate_with
from cellseg.files import save_png

SIZES = (1, 3, 10)
SCORES = ("map", "ap50_pooled", "iou_nuclei")


def kind_of(image: np.ndarray) -> str:
    """stained (colour), brightfield (grey on a light background), large (grey fluorescence over
    300,000 pixels) or small (grey fluorescence)."""
    if image_kind(image) == "colour":
        return "stained"
    grey = normalize(to_channels(image, 1).astype(np.float32))
    if grey.mean() > 0.5:
        return "brightfield"
    return "large" if image.shape[0] * image.shape[1] > 300_000 else "small"


def write_folder(folder: Path, samples: list) -> Path:
    """Samples in the folder layout (images/<id>.png, masks/<id>.png of instance labels)."""
    for sub in ("images", "masks"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for s in samples:
        name = s.id.replace("/", "_")
        save_png(folder / "images" / f"{name}.png", s.image)
        save_png(folder / "masks" / f"{name}.png", s.labels.astype(np.uint16))
    return folder


def scores(model: str, root: Path) -> dict[str, float]:
    metrics, _ = evaluate_with([f"model_name={model}", "data=folder", f"data.root={root}",
                                "split=all"])
    return {k: round(float(metrics[k]), 4) for k in SCORES}


def val_scores_by_kind(model: str, kinds: dict[str, str]) -> dict[str, float]:
    _, rows = evaluate_with([f"model_name={model}", "split=val"])
    by_kind: dict[str, list[float]] = {}
    for r in rows:
        by_kind.setdefault(kinds[r["id"]], []).append(r["map"])
    return {k: round(float(np.mean(v)), 4) for k, v in sorted(by_kind.items())}


def train_once(run: Path, overrides: list[str]) -> str:
    """``cellseg.train`` with ``overrides`` into ``run`` unless its last.ckpt exists; that file."""
    ckpt = run / "checkpoints/last.ckpt"
    if not ckpt.is_file():
        subprocess.run([sys.executable, "-m", "cellseg.train", *overrides,
                        f"hydra.run.dir={run}"], check=True, stdout=subprocess.DEVNULL)
    return str(ckpt)


def train(folder: Path, run: Path, pretrained: str | None) -> str:
    """experiment=finetune on ``folder`` from ``pretrained``, or from scratch (None) at the
    recipes' learning rate."""
    scratch = ["model.optimizer.lr=1e-3"] if pretrained is None else []
    return train_once(run, ["experiment=finetune", f"data.root={folder}",
                            f"pretrained={pretrained or 'null'}", *scratch])


def model_samples(model: str) -> tuple[dict, dict, dict]:
    """A model's split ids, its train, val and test samples by id, and each one's kind."""
    data = checkpoint.load(model).data
    splits = data["splits"]
    sources = run_sources(data["hparams"])
    samples = {i: sources[i].read() for s in ("train", "val", "test") for i in splits[s]}
    return splits, samples, {i: kind_of(s.image) for i, s in samples.items()}


def main(out: str, model: str = "nuclei", kind: str | None = None) -> None:
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    splits, samples, kinds = model_samples(model)
    by_kind = val_scores_by_kind(model, kinds)
    measured = kind or min(by_kind, key=by_kind.get)
    if measured not in by_kind:
        raise SystemExit(f"no validation images of kind {measured!r}: choose one of "
                         f"{list(by_kind)}")
    print(f"validation map by kind: {by_kind}; measured: {measured}", flush=True)
    held = [samples[i] for i in [*splits["val"], *splits["test"]] if kinds[i] == measured]
    pool = [samples[i] for i in splits["train"] if kinds[i] == measured]
    rows = measure(out_dir, model, held, pool)
    chosen = "Measured kind" if kind else "Worst kind on validation"
    write_table(out_dir, rows, f"{chosen}: **{measured}** (map by kind: {by_kind}); scored on "
                f"its {len(held)} held-back images (validation and test).",
                {"kind": measured, "chosen_as_worst": kind is None, "by_kind": by_kind,
                 "held": len(held)})


def measure(out_dir: Path, model: str, held: list, pool: list) -> list[dict]:
    """``model`` as it is, fine-tuned on 1, 3 and 10 of the ``pool`` samples (drawn once,
    seeded, the smaller sets inside the larger) and trained from scratch on them, each scored
    on the ``held`` samples. A run whose last.ckpt exists is not trained again."""
    order = [pool[i] for i in np.random.default_rng(0).permutation(len(pool))]
    held_root = write_folder(out_dir / "held", held)
    rows = [{"model": f"{model} as it is", "images": 0, **scores(model, held_root)}]
    for n in SIZES:
        folder = write_folder(out_dir / f"train{n}", order[:n])
        for label, pretrained in (("fine-tuned", model), ("from scratch", None)):
            run = out_dir / f"{label.replace(' ', '_')}_{n}"
            ckpt = train(folder, run, pretrained)
            rows.append({"model": label, "images": n, **scores(ckpt, held_root)})
            print(rows[-1], flush=True)
    return rows


def write_table(out_dir: Path, rows: list[dict], heading: str, facts: dict) -> None:
    """OUT_DIR/finetune.md (``heading`` and the table) and finetune.json (``facts``, rows)."""
    table = ["| model | training images | " + " | ".join(SCORES) + " |",
             "|---|---|" + "---|" * len(SCORES)]
    table += [f"| {r['model']} | {r['images']} | " + " | ".join(f"{r[k]:.3f}" for k in SCORES)
              + " |" for r in rows]
    text = heading + "\n\n" + "\n".join(table) + "\n"
    (out_dir / "finetune.md").write_text(text)
    (out_dir / "finetune.json").write_text(json.dumps({**facts, "rows": rows}, indent=2))
    print(text)


if __name__ == "__main__":
    if not 2 <= len(sys.argv) <= 4:
        raise SystemExit(__doc__)
    main(*sys.argv[1:])
