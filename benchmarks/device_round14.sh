#!/usr/bin/env bash
# Call L1 (an H100; carry .whl): issue 22 on this tree (the daemon's burst no longer leaves the 4 interactive
# slots empty: queued work takes them last, a question takes one back; the intake no longer holds the engine
# for a few hundred files).  1. fp32 bench --verify (an engine change); 2. bench --end-to-end; 3. api_ttft.py
# under a 1200-image backlog.  Predictions: NOTES "Call L1".
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
step verify-fp32 ${VERIFY_LIMIT:-80} bench --verify --load-format dummy --new-tokens 128
step bench-e2e ${E2E_LIMIT:-215} bench --load-format dummy --ignore-eos --images 256 --baseline-images 0 \
    --latency-images 0 --end-to-end --end-to-end-timeout 200
ttft
exit 0
