#!/usr/bin/env bash
# Call K1 (next session, an H100; carry .whl and .whl525): what issue 22 still owes on one H100.
# 1. bench --end-to-end with the daemon's own account of the timed run (prefill, decode, starved: issue 22.6);
# 2. api_ttft.py under a 1200-image backlog (session 4's figures are an H200's; J1's lost its daemon to a wheel);
# 3. issue 22.4's "engine on the device against 5.25": transformers 5.25 from .whl525, fp32 bench --verify and
#    the 1036x1036/256 bench. Predictions: NOTES "Call K1".
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
step bench-e2e ${E2E_LIMIT:-230} bench --load-format dummy --ignore-eos --images 256 --baseline-images 0 \
    --latency-images 0 --end-to-end --end-to-end-timeout 200
ttft
with_transformers_525 || { echo "transformers 5.25 did not install"; exit 0; }
step verify-fp32-tf525 ${VERIFY_LIMIT:-90} bench --verify --load-format dummy --new-tokens 128
exit 0
