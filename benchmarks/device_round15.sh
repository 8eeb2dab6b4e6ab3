#!/usr/bin/env bash
# Call L2 (an H100; carry .whl and .whl525): issue 22.1's api_ttft.py under a 1200-image backlog with the
# preempting scheduler (never measured on an H100: J1 lost its daemon to a wheel), then issue 22.4's engine
# against transformers 5.25: fp32 bench --verify.  Predictions: NOTES "Call L2".
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
ttft
with_transformers_525 || { echo "transformers 5.25 did not install"; exit 0; }
step verify-fp32-tf525 ${VERIFY_LIMIT:-100} bench --verify --load-format dummy --new-tokens 128
exit 0
