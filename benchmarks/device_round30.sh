#!/usr/bin/env bash
# Call R2 (next session, an H100; carry .whl; from a clean, committed main): the three quantized fp32 checks
# again, now that bench --verify gives stock's margin at each parting: the fp8 cache alone, fp8 weights alone,
# and both (what the `kv-auto` branch's defaults pick).  Predictions: NOTES "Call R2".
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
v=(bench --verify --load-format dummy --new-tokens 128)
step verify-fp32-kvfp8 ${VERIFY_LIMIT:-110} "${v[@]}" --kv-cache-dtype fp8
step verify-fp32-fp8 ${VERIFY_LIMIT:-110} "${v[@]}" --quantization fp8
step verify-fp32-fp8-kvfp8 ${VERIFY_LIMIT:-110} "${v[@]}" --quantization fp8 --kv-cache-dtype fp8
exit 0
