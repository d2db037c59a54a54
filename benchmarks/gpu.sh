#!/usr/bin/env bash
# The prepared GPU check (one CUDA device; every step has a time limit, 11 minutes at most in all):
# host syncs per training step (ViT-B and Swin-T, global and isolated), ViT-B/16 LocalMIM vs MAE vs
# MaskFeat step time and memory in bf16 at batch 256 (isolated vs global memory, torch.compile), then
# the per-stage table of `isolocal info`. Runs from a plain checkout: the repository root goes on
# PYTHONPATH, no install needed. Every step runs even when an earlier one fails; the script then
# exits 1 naming the failed steps. Prints tables; nothing is written outside $OUT (./gpu-results).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! python -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  echo "benchmarks/gpu.sh needs a CUDA device (torch.cuda.is_available() is False here); nothing was run" >&2
  exit 2
fi
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
failed=()

step() {  # step NAME SECONDS COMMAND...: run with a time limit, tee to $OUT/NAME.txt, record a failure
  local name=$1 limit=$2
  shift 2
  echo "== $name: $*"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then
    echo "== $name FAILED (exit $rc)"
    failed+=("$name")
  fi
}

step device 60 python -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"
step syncs 150 python -m benchmarks.bench_syncs --device cuda --amp bf16 --batch 64 --verbose \
  --presets localmim_vit_base,localmim_swin_tiny
step bench_models_base_bf16 360 python -m benchmarks.bench_models --device cuda --amp bf16 --sizes base \
  --batch "${BATCH:-256}" --warmup 3 --iters 10 --compile
step info_vit_base 90 python -m isolocal info -c experiments/vit_base_localmim_hog.toml --set train.device=cuda

if [ "${#failed[@]}" -gt 0 ]; then
  echo "gpu.sh: failed steps: ${failed[*]} (outputs in $OUT/)" >&2
  exit 1
fi
echo "gpu.sh: all steps passed (outputs in $OUT/)"
