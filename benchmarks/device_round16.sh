#!/usr/bin/env bash
# Call M1 (next session, an H100; carry .whl): what issue 22 still owes after session 6.
# 1. fp32 bench --verify after the slots.py / static_cache.py split and the step-budget change;
# 2. api_ttft.py as in L1 (the turn's prefills now stay within step_tokens: the stream's worst pause);
# 3. api_ttft.py --ask-after 12: every ask meets a full engine and takes a slot back (the preemption path on
#    the GPU).  Predictions: NOTES "Call M1".
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
step verify-fp32 ${VERIFY_LIMIT:-80} bench --verify --load-format dummy --new-tokens 128
ttft ttft
ttft ttft-full --ask-after 12
exit 0
