#!/usr/bin/env bash
# Call P2 (next session, an H100; carry .whl; from a clean, committed tree): issue 22's worst pause after the
# stretches beside a stream became 0.04 s, and the preemption path (--ask-after 12) that M1 had no time for.
# Predictions: NOTES "Calls P1 and P2".
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
# the fp32 verify owed by the engine commits after 1a80c25 (the FP8 write, the scales list, the shorter stretches)
step verify-fp32 ${VERIFY_LIMIT:-80} bench --verify --load-format dummy --new-tokens 128
ttft ttft
ttft ttft-full --ask-after 12
exit 0
