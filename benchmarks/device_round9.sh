#!/usr/bin/env bash
# Call J2: FP8 at few rows (issue 23's batch-1 target). 1. benchmarks/fp8_gemv_probe.py: fp8_gemv's weight-only
# kernel against bf16 F.linear and _scaled_mm (+ compiled quantization) on the 7B's four projections, 1-64 rows,
# after a tile sweep; 2. benchmarks/fp8_check.py, now with stock generate's one-row decode calls in the kernel
# part; 3. batch 1 (one 1036x1036 image, 256 tokens): bf16, fp8 with the kernel, fp8 without it
# (J2 ran that as VLWATCH_FP8_ROWS_KERNEL=0; it is the engine option now), same machine, one call.
# Predictions: NOTES "Call J2".
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
echo "+ benchmarks/fp8_gemv_probe.py" | tee "$OUT/fp8-gemv-probe.log"
timeout ${PROBE_LIMIT:-120} python3 benchmarks/fp8_gemv_probe.py --out "$OUT" 2>&1 | tee -a "$OUT/fp8-gemv-probe.log"
echo "+ benchmarks/fp8_check.py" | tee "$OUT/fp8-check.log"
timeout ${CHECK_LIMIT:-100} python3 benchmarks/fp8_check.py --load-format dummy --new-tokens 48 --out "$OUT" 2>&1 | tee -a "$OUT/fp8-check.log"
one=(bench --load-format dummy --ignore-eos --images 2 --batch-sizes '' --baseline-images 0 --latency-images 3)
step batch1-bf16 ${B1_LIMIT:-75} "${one[@]}" --quantization none
step batch1-fp8 ${B1_LIMIT:-75} "${one[@]}" --quantization fp8
step batch1-fp8-scaled-mm ${B1_LIMIT:-75} "${one[@]}" --quantization fp8 --engine fp8_rows_kernel=false
exit 0
