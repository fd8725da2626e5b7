#!/usr/bin/env bash
# Regenerate (or, with --check, compare against) the committed figures under docs/results/ for the
# trained Fashion-MNIST members, on the full test set (needs Debian's dataset-fashion-mnist).
# Each build runs alone: latency is measured, so run nothing else on the machine meanwhile.
#
#   tools/regen_results.sh [--check] [MODEL...]     (default: every shipped fmnist member)
set -euo pipefail
cd "$(dirname "$0")/.."
check=0
if [[ ${1:-} == --check ]]; then check=1; shift; fi
models=("$@")
[[ ${#models[@]} -gt 0 ]] || models=(fmnist convmixer-fmnist vip-fmnist cyclemlp-fmnist)
edgemix=${EDGEMIX:-.venv/bin/edgemix}
python=${PYTHON:-.venv/bin/python}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
rc=0
for model in "${models[@]}"; do
  for target in phone jetson; do
    cmd="edgemix build --target $target --model $model --eval-data fashion-mnist"
    $edgemix build --target "$target" --model "$model" --eval-data fashion-mnist --out "$tmp/$model-$target" -q \
      || { echo "build failed: $cmd" >&2; rc=1; continue; }
    if [[ $check == 1 ]]; then
      echo "== $model $target"
      $python tools/record_result.py "$tmp/$model-$target/report.json" --check "docs/results/${model}_${target}_int8.json" || rc=1
    else
      $python tools/record_result.py "$tmp/$model-$target/report.json" --command "$cmd"
    fi
  done
done
exit $rc
