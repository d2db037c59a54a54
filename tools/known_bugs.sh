#!/usr/bin/env bash
# The four one-line bugs that once passed the suite, each introduced into a copy of the committed tree
# (git archive HEAD), then the test files that must notice it, with -x. Every line of the summary must say "1 failed".
#   bash tools/known_bugs.sh            (about 2 minutes on 2 cores; never touches the checkout)
set -uo pipefail
SRC="$(cd "$(dirname "$0")/.." && pwd)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
declare -A FILE EDIT
FILE[loss_on_visible_tokens]=isolocal/models/encoder.py
EDIT[loss_on_visible_tokens]='s/regrid(mask, self.mask_grid/regrid(~mask, self.mask_grid/'
FILE[data_parallel_sum]=isolocal/train/distributed.py
EDIT[data_parallel_sum]='s/^\(\s*\)flat \/= self.world/\1pass/'
FILE[hog_bias_subtracted]=isolocal/core/targets.py
EDIT[hog_bias_subtracted]='s/g = g + bias.to(g.device)/g = g - bias.to(g.device)/'
FILE[stagewise_detach_dropped]=isolocal/core/stages.py
EDIT[stagewise_detach_dropped]='s/^\(\s*\)return x.detach()/\1return x/'
TESTS=(tests/test_model.py tests/test_train.py tests/test_targets.py tests/test_swin.py tests/test_gpu_readiness.py)
status=0
for bug in loss_on_visible_tokens data_parallel_sum hog_bias_subtracted stagewise_detach_dropped; do
  tree="$WORK/$bug"; mkdir -p "$tree"
  (cd "$SRC" && git archive HEAD) | tar -xf - -C "$tree"
  sed -i "${EDIT[$bug]}" "$tree/${FILE[$bug]}"
  if (cd "$SRC" && git show "HEAD:${FILE[$bug]}") | cmp -s - "$tree/${FILE[$bug]}"; then
    echo "$bug: the edit no longer applies to ${FILE[$bug]}; update this script"; status=1; continue
  fi
  summary=$(cd "$tree" && PYTHONPATH="$tree" python -m pytest -q -x -p no:cacheprovider "${TESTS[@]}" 2>&1 | grep -E '^FAILED|(passed|failed).* in ')
  echo "$bug: $(echo "$summary" | tr '\n' ' ')"
  echo "$summary" | grep -q '^FAILED' || status=1
done
exit $status
