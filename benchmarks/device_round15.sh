#!/usr/bin/env bash
# Call L2 (right after L1, same machine; carry .whl, .whl525 and .ab_old = `git archive caea5d2 daemon`, the
# tree before session 6): 1. bench --end-to-end on the tree before, for the A/B with L1's; 2. issue 22.4's
# engine against transformers 5.25: fp32 bench --verify.  Predictions: NOTES "Call L2".
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
e2e=(bench --load-format dummy --ignore-eos --images 256 --baseline-images 0 --latency-images 0 --end-to-end
     --end-to-end-timeout 200)
if [ -d .ab_old/daemon ]; then
    echo "+ (tree before) vlwatch ${e2e[*]}" | tee "$OUT/bench-e2e-before.log"
    (cd .ab_old && PYTHONPATH=/tmp/site:$PWD timeout ${E2E_LIMIT:-215} python3 -m daemon "${e2e[@]}") 2>&1 \
        | tee -a "$OUT/bench-e2e-before.log"
fi
with_transformers_525 || { echo "transformers 5.25 did not install"; exit 0; }
step verify-fp32-tf525 ${VERIFY_LIMIT:-100} bench --verify --load-format dummy --new-tokens 128
exit 0
