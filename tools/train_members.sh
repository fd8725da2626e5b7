#!/usr/bin/env bash
# Train the small Fashion-MNIST members of the Mixer relatives, side by side (one process each), the
# way the shipped weights were made. On a GPU each run takes a few minutes; on a 2-core CPU about
# 10-14 minutes an epoch (use --threads 1 and one run at a time there).
#
#   tools/train_members.sh DATA_FOLDER OUT_FOLDER EPOCHS MODEL [MODEL...]
#
# TIMEOUT=SECONDS (optional) stops each run after that long; its last.pt holds the epochs done.
# DATA_FOLDER holds the four Fashion-MNIST IDX files (Debian: /usr/share/datasets/fashion-mnist).
# Each MODEL is trained into OUT_FOLDER/MODEL-eEPOCHS/{model.pt,last.pt,train.log}; model.pt carries
# the spec, the command's settings and the per-epoch history (loss, test top-1, seconds).
set -euo pipefail
data=$1 out=$2 epochs=$3; shift 3
edgemix=${EDGEMIX:-edgemix}
pids=()
for model in "$@"; do
  run="$out/$model-e$epochs"
  mkdir -p "$run"
  ${TIMEOUT:+timeout $TIMEOUT} $edgemix train --model "$model" --data "$data" --epochs "$epochs" --seed 0 --threads "${THREADS:-2}" \
    --out "$run" >"$run/train.log" 2>&1 &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=1; done
for model in "$@"; do tail -n 2 "$out/$model-e$epochs/train.log"; done
exit $rc
