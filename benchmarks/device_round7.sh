#!/usr/bin/env bash
# Call H1 (session 3, device time scarce): what decides the open issues first, in one call.
# 1. fp32 `bench --verify` (owed after the engine changes of sessions 2-3), 2. api_ttft after the rules'
# sizing and the idle warm-up (issue 22's latency targets), 3. FP8 shown correct (benchmarks/fp8_check.py,
# then `bench --verify --quantization fp8`). Predictions: NOTES "Call G1" and "Calls G2 and G3".
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
step verify-fp32 ${VERIFY_LIMIT:-110} bench --verify --load-format dummy --new-tokens 128
ttft
[[ -n ${SKIP_FP8:-} ]] && exit 0  # device time short: the FP8 checks wait for the next call
echo "+ benchmarks/fp8_check.py" | tee "$OUT/fp8-check.log"
timeout ${CHECK_LIMIT:-100} python3 benchmarks/fp8_check.py --load-format dummy --new-tokens 48 --out "$OUT" 2>&1 | tee -a "$OUT/fp8-check.log"
step verify-fp32-fp8 ${VERIFY_LIMIT:-110} bench --verify --load-format dummy --new-tokens 128 --quantization fp8
exit 0
