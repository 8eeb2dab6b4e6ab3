#!/usr/bin/env bash
# Call J1 (next session): what issue 22 still needs, in one call.
# 1. fp32 `bench --verify` on the tree after session 4's moves (loading.py out of backend.py, store/, intake/,
#    bench/): nothing in the arithmetic changed, so 8 of 8 is expected; 2. `bench --end-to-end` (issue 22.6:
#    the real daemon, files in, sidecars out, against the engine-only figure of the same run; target >= 90%);
# 3. api_ttft again if the card is an H100 (session 4's figures are an H200's). Predictions: NOTES "Call J1".
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
step verify-fp32 ${VERIFY_LIMIT:-110} bench --verify --load-format dummy --new-tokens 128
step bench-e2e ${E2E_LIMIT:-330} bench --load-format dummy --ignore-eos --images 256 --baseline-images 0 \
    --latency-images 0 --end-to-end --end-to-end-timeout 300
if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H100; then
    ttft
fi
exit 0
