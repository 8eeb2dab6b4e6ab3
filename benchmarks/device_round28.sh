#!/usr/bin/env bash
# Call Q5 (session 11, right after Q4 on the same machine; carry .whl): issue 22's own api_ttft setup on the
# tree with the scheduler's new victim rule (P2, before it, met every stream target).  Prediction: NOTES "Call Q4".
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
ttft ttft-std
exit 0
