#!/usr/bin/env bash
# Call R4 (an H100; carry .whl; from a clean, committed tree; after R1 on the same lease if it can): batch 1 in
# fp8 with the few-row kernel widening its weight by conversion (the default) and by moving bits
# (engine.fp8_widen: bits), same call, 7B and 3B; then fp8_check.py with bits (the kernel against its fp32
# emulation, call by call); last, the 3B's batch-1 decode step kernel by kernel (what is left past the weights'
# read: the next lever for its <= 0.7 s).  Predictions: NOTES "Call R4".
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
echo "+ profile_decode.py --model 3B fp8, fp8 cache, bits, batch 1" | tee "$OUT/profile-3b-b1.log"
timeout ${PROF_LIMIT:-120} python3 benchmarks/profile_decode.py --model Qwen/Qwen2.5-VL-3B-Instruct --quantization fp8 \
    --kv-cache-dtype fp8 --engine fp8_widen=bits --cases 1x1792x1500 --no-variants --out "$OUT/profile-3b-b1" 2>&1 \
    | grep -v -e 'UserWarning' -e 'warnings.warn' | tee -a "$OUT/profile-3b-b1.log"
exit 0
