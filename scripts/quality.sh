#!/usr/bin/env bash
# Issue 15's measurements on the real data, on an otherwise idle machine (times are wall clock).
#   scripts/quality.sh levers   # native vs each of its levers off (~1.25 h)
#   scripts/quality.sh time     # the time-to-quality curve: 40/120/240/480 epochs, ~5/15/30/60 min (~2 h)
#   scripts/quality.sh seeds    # RECIPE (default: experiment=native) with seeds 0, 1, 2 (~45 min;
#                               # RECIPE=experiment=native_long: ~1.5 h), into logs/quality/<recipe>_sN
#   scripts/quality.sh summary  # logs/quality/summary.md from every evaluated run
#   scripts/quality.sh run NAME OVERRIDES...  # one run (e.g. run seed_1 experiment=native seed=1)
# Every run is scored on the 10 test images by cellseg.eval three times: with the post-processing
# tuned on its 4 validation images (eval/), with instances()' defaults (eval_defaults/) and tuned
# with 8-fold test-time augmentation (eval_tta/, inference.tta=true).
# Peers: see ../shared/peers/RESULTS.md; score their label PNGs against the same test ids.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${DSB2018:-data/dsb2018/stage1_train}   # as the Makefile; DSB2018=DIR elsewhere
[[ -d $DATA || -n ${DSB2018:-} ]] || DATA=../shared/data/dsb2018/stage1_train
OUT=${OUT:-logs/quality}
RECIPE=${RECIPE:-experiment=native}
DEFAULTS="instances.threshold=0.5 instances.contour_threshold=0.5 instances.seed_threshold=0.5
  instances.seed_h=0.0 instances.min_size=10 instances.h=2.0 instances.offset_threshold=1.0
  instances.min_score=0.0"

run() {  # run NAME OVERRIDES...: train (timed), then evaluate tuned and untuned
  local name=$1; shift
  local dir=$OUT/$name
  [[ -d $DATA ]] || { echo "DSB2018=$DATA is not a folder; set DSB2018=<stage1_train>" >&2; exit 2; }
  if [[ ! -f $dir/checkpoints/last.ckpt ]]; then
    local start=$SECONDS
    $PY -m cellseg.train data=dsb2018 data.root="$DATA" "$@" hydra.run.dir="$dir"
    echo "$((SECONDS - start))" > "$dir/train_seconds"
  fi
  local ckpt=$dir/checkpoints/last.ckpt
  $PY -m cellseg.eval ckpt_path="$ckpt" data=dsb2018 data.root="$DATA" hydra.run.dir="$dir/eval"
  # shellcheck disable=SC2086
  $PY -m cellseg.eval ckpt_path="$ckpt" data=dsb2018 data.root="$DATA" $DEFAULTS \
    hydra.run.dir="$dir/eval_defaults"
  $PY -m cellseg.eval ckpt_path="$ckpt" data=dsb2018 data.root="$DATA" inference.tta=true \
    hydra.run.dir="$dir/eval_tta"
}

summary() {
  $PY - "$OUT" <<'EOF'
"""One row per run: train minutes, test scores (tuned, defaults, tuned + tta)."""
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
lines = ["| run | train min | iou | map | ap50 (per image) | ap50 (pooled) | map, defaults "
         "| iou, tta | map, tta | ap50 pooled, tta |", "|---|---|---|---|---|---|---|---|---|---|"]
for run in sorted(p.parent.parent for p in out.glob("*/eval/metrics.json")):
    m = json.loads((run / "eval/metrics.json").read_text())
    d = json.loads((run / "eval_defaults/metrics.json").read_text())
    tta = run / "eval_tta/metrics.json"
    tta = json.loads(tta.read_text()) if tta.exists() else {}
    pooled, tta_pooled = m.get("ap50_pooled", float("nan")), tta.get("ap50_pooled", float("nan"))
    seconds = run / "train_seconds"
    minutes = f"{int(seconds.read_text()) / 60:.1f}" if seconds.exists() else "?"
    lines.append(f"| {run.name} | {minutes} | {m['iou']:.3f} | {m['map']:.3f} | {m['ap50']:.3f} "
                 f"| {pooled:.3f} | {d['map']:.3f} | {tta.get('iou', float('nan')):.3f} "
                 f"| {tta.get('map', float('nan')):.3f} | {tta_pooled:.3f} |")
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
}

if [[ ${1:-} == run ]]; then shift; run "$@"; exit; fi
for step in "${@:-summary}"; do
  case $step in
    levers)  # experiment=native is stain + scale + distance + touching weight; each taken away in turn
      run native experiment=native
      run native_no_touching experiment=native data.touching_weight=0
      run native_no_stain experiment=native augmentation=nuclei_scale
      run native_no_scale experiment=native augmentation=nuclei   # (nor stain variation)
      run native_contour_only experiment=native model.net.out_channels=2
      ;;
    time)  # the cosine schedule follows max_epochs (README: minutes per epoch on this machine)
      for epochs in 40 120 240 480; do run "time_${epochs}" "$RECIPE" trainer.max_epochs=$epochs; done
      ;;
    seeds)
      tag=${RECIPE#experiment=}; tag=${tag//[^A-Za-z0-9_.-]/_}   # one folder per recipe and seed
      for seed in 0 1 2; do run "${tag}_s${seed}" "$RECIPE" seed=$seed; done
      ;;
    summary) summary ;;
    *) echo "unknown step $step; use levers, time, seeds or summary" >&2; exit 2 ;;
  esac
done
