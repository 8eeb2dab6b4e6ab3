#!/usr/bin/env bash
# Call L1 (an H100; carry .whl and .ab_old, the tree before the preemption change: `git archive caea5d2 daemon`).
# Issue 22.6: the daemon's burst no longer leaves the 4 interactive slots empty (queued work takes them last; a
# question takes one back).  1. fp32 bench --verify on this tree (an engine change); 2. bench --end-to-end on
# this tree; 3. the same on the tree before it, in the same call.  Predictions: NOTES "Call L1".
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
step verify-fp32 ${VERIFY_LIMIT:-80} bench --verify --load-format dummy --new-tokens 128
e2e=(bench --load-format dummy --ignore-eos --images 256 --baseline-images 0 --latency-images 0 --end-to-end
     --end-to-end-timeout 200)
step bench-e2e ${E2E_LIMIT:-215} "${e2e[@]}"
if [ -d .ab_old/daemon ]; then
    echo "+ (tree before) vlwatch ${e2e[*]}" | tee "$OUT/bench-e2e-before.log"
    (cd .ab_old && PYTHONPATH=/tmp/site:$PWD timeout ${E2E_LIMIT:-215} python3 -m daemon "${e2e[@]}") 2>&1 \
        | tee -a "$OUT/bench-e2e-before.log"
fi
exit 0
