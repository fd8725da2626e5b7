#!/usr/bin/env bash
# Regenerate (or, with --check, compare against) the committed figures under docs/results/ for the
# trained Fashion-MNIST members, on the full test set (needs Debian's dataset-fashion-mnist).
# With --random: paper-size variants with random weights on 200 images of the shipped sample (no
# trained weights can be downloaded here; what these records show is drift against the FP32 model
# and INT8's speed at the size people deploy), recorded as MODEL-random_TARGET_int8.json.
# Each build runs alone: latency is measured, so run nothing else on the machine meanwhile.
#
#   tools/regen_results.sh [--check] [MODEL...]            (default: every shipped fmnist member)
#   tools/regen_results.sh --random [--check] [MODEL...]   (default: one paper variant per family)
set -euo pipefail
cd "$(dirname "$0")/.."
random=0
if [[ ${1:-} == --random ]]; then random=1; shift; fi
check=0
if [[ ${1:-} == --check ]]; then check=1; shift; fi
models=("$@")
if [[ ${#models[@]} -eq 0 ]]; then
  if [[ $random == 1 ]]; then models=(s16 convmixer-1024-20 vip-s7 cyclemlp-b1)
  else models=(fmnist convmixer-fmnist vip-fmnist cyclemlp-fmnist); fi
fi
edgemix=${EDGEMIX:-.venv/bin/edgemix}
python=${PYTHON:-.venv/bin/python}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
rc=0
for model in "${models[@]}"; do
  for target in phone jetson; do
    if [[ $random == 1 ]]; then args=(--random-weights --eval-limit 200); name=$model-random
    else args=(--eval-data fashion-mnist); name=$model; fi
    cmd="edgemix build --target $target --model $model ${args[*]}"
    $edgemix build --target "$target" --model "$model" "${args[@]}" --out "$tmp/$model-$target" -q \
      || { echo "build failed: $cmd" >&2; rc=1; continue; }
    if [[ $check == 1 ]]; then
      echo "== $name $target"
      $python tools/record_result.py "$tmp/$model-$target/report.json" --check "docs/results/${name}_${target}_int8.json" || rc=1
    else
      # into docs/results/ only when every build is done: a record written there earlier would make
      # the next build's tree dirty (its git_commit "+dirty")
      $python tools/record_result.py "$tmp/$model-$target/report.json" --command "$cmd" --name "${name}_${target}_int8" \
        --results-dir "$tmp/records"
    fi
  done
done
if [[ $check == 0 ]] && compgen -G "$tmp/records/*.json" >/dev/null; then
  cp "$tmp"/records/*.json docs/results/
  (cd "$tmp/records" && printf "docs/results/%s\n" *.json)
fi
exit $rc
