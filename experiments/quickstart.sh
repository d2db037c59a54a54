#!/usr/bin/env bash
# The README's main job: install, then the quickstart study (LocalMIM global vs isolated vs MAE on
# Fashion-MNIST: pre-training, k-NN, per-stage linear probes, attention analysis, report).
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/install
python -m isolocal compare -c experiments/quickstart.toml "$@"
