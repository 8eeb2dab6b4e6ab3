#!/usr/bin/env bash
# Call R4 (an H100; carry .whl; from a clean, committed tree; after R1 on the same lease if it can): batch 1 in
# fp8 with the few-row kernel widening its weight by conversion (the default) and by moving bits
# (engine.fp8_widen: bits), same call, 7B and 3B; then fp8_check.py with bits (the kernel against its fp32
# emulation, call by call).  Predictions: NOTES "Call R4".
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
b1=(bench --load-format dummy --ignore-eos --images 2 --batch-sizes '' --baseline-images 0 --latency-images 3
    --quantization fp8 --kv-cache-dtype fp8)
step batch1-7b-bits ${B1_LIMIT:-70} "${b1[@]}" --engine fp8_widen=bits
step batch1-7b-convert ${B1_LIMIT:-70} "${b1[@]}"
step batch1-3b-bits ${B1_LIMIT:-60} "${b1[@]}" --model Qwen/Qwen2.5-VL-3B-Instruct --engine fp8_widen=bits
step batch1-3b-convert ${B1_LIMIT:-60} "${b1[@]}" --model Qwen/Qwen2.5-VL-3B-Instruct
echo "+ fp8_check.py --engine fp8_widen=bits" | tee "$OUT/fp8-check-bits.log"
timeout ${CHECK_LIMIT:-150} python3 benchmarks/fp8_check.py --engine fp8_widen=bits --out "$OUT/fp8-check-bits" 2>&1 \
    | grep -v -i warn | tee -a "$OUT/fp8-check-bits.log"
exit 0
