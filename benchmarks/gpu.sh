#!/usr/bin/env bash
# The prepared GPU check (one CUDA device, under 8 minutes): ViT-B/16 LocalMIM vs MAE vs MaskFeat
# step time and memory in bf16 at batch 256, isolated vs global memory, then the per-stage table of
# `isolocal info`. Prints tables; nothing is written outside $OUT (default: ./gpu-results).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
timeout 360 python benchmarks/bench_models.py --device cuda --amp bf16 --sizes base --batch "${BATCH:-256}" \
  --warmup 3 --iters 10 --compile | tee "$OUT/bench_models_base_bf16.txt"
timeout 90 python -m isolocal info -c experiments/vit_base_localmim_hog.toml --set train.device=cuda \
  | tee "$OUT/info_vit_base.txt"
