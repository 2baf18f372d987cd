"""Fine-tuning on a kind of image the model has never seen (docs/model.md#fine-tuning).

    python scripts/unseen_kind.py OUT_DIR [KIND] [EPOCHS]    (KIND: stained, EPOCHS: 30)

The shipped model saw every kind of DSB image, so fine-tuning it on a few images of one kind
measures little. This trains a stand-in that never saw KIND and fine-tunes that:

1. The shipped model's training and validation images of every other kind, written to
   OUT_DIR/without (folder layout).
2. ``experiment=general`` on them alone (``data=folder``, 10 % held out for validation, no test
   split) for EPOCHS epochs: OUT_DIR/run.
3. ``finetune_table``'s measurement from OUT_DIR/run's last weights on KIND: scored on the shipped
   model's validation and test images of KIND, fine-tuned on 1, 3 and 10 of its training images
   of KIND, the same sets as ``finetune_table.py`` draws (so its from-scratch runs are the same
   runs: a from_scratch_N folder copied into OUT_DIR is not trained again). The shipped model
   as it is is scored on the same images for reference. Writes OUT_DIR/finetune.md and .json.
"""

from __future__ import annotations

import sys
from pathlib import Path

from finetune_table import measure, model_samples, scores, train_once, write_folder, write_table


def train_without(folder: Path, run: Path, epochs: int) -> str:
    """experiment=general on ``folder`` alone; the run's last weights."""
    return train_once(run, ["experiment=general", "data=folder", f"data.root={folder}",
                            "data.train_roots=[]", "data.test_size=0", "test=false",
                            f"trainer.max_epochs={epochs}"])


def main(out: str, kind: str = "stained", epochs: str = "30") -> None:
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    splits, samples, kinds = model_samples("nuclei")
    if kind not in kinds.values():
        raise SystemExit(f"no images of kind {kind!r}: choose one of {sorted(set(kinds.values()))}")
    others = [samples[i] for i in [*splits["train"], *splits["val"]] if kinds[i] != kind]
    model = train_without(write_folder(out_dir / "without", others), out_dir / "run", int(epochs))
    held = [samples[i] for i in [*splits["val"], *splits["test"]] if kinds[i] == kind]
    pool = [samples[i] for i in splits["train"] if kinds[i] == kind]
    rows = measure(out_dir, model, held, pool)
    rows.insert(0, {"model": "nuclei (saw this kind) as it is", "images": 0,
                    **scores("nuclei", out_dir / "held")})
    write_table(out_dir, rows, f"Kind never seen: **{kind}** (a model trained {epochs} epochs on "
                f"the shipped model's {len(others)} images of other kinds); scored on the "
                f"shipped model's {len(held)} validation and test images of that kind.",
                {"kind": kind, "epochs": int(epochs), "trained_on": len(others),
                 "held": len(held)})


if __name__ == "__main__":
    if not 2 <= len(sys.argv) <= 4:
        raise SystemExit(__doc__)
    main(*sys.argv[1:])
