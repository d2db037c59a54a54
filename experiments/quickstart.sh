#!/usr/bin/env bash
# The README's main job: install, then the quickstart study (LocalMIM global vs isolated vs the same
# encoder at random init, on Fashion-MNIST: pre-training with live progress, k-NN, per-stage linear
# probes, attention analysis, report in reports/quickstart/report.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/install
python -m isolocal compare -c experiments/quickstart.toml "$@"
