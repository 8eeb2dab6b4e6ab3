#!/usr/bin/env bash
# Call M2 (next session, an H100; carry .whl): issue 23 on an H100. First the few-row kernel's split-K probe,
# then batch 1 fp8 with split-K 1 and auto (engine.fp8_rows_split=0), then whole-card pages 1008x1288/768 in
# fp8 against bf16 (same call).  Predictions: NOTES "Call M2".
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
(timeout ${PROBE_LIMIT:-200} python3 benchmarks/fp8_gemv_probe.py --model 7b --out "$OUT" 2>&1 | grep -v -i warn) \
    | tee "$OUT/fp8-gemv-probe-7b.log"
b1=(bench --load-format dummy --ignore-eos --images 2 --batch-sizes '' --baseline-images 0 --latency-images 3
    --quantization fp8)
step batch1-fp8 ${B1_LIMIT:-70} "${b1[@]}"
step batch1-fp8-split-auto ${B1_LIMIT:-70} "${b1[@]}" --engine fp8_rows_split=0
page=(bench --load-format dummy --ignore-eos --size 1008x1288 --new-tokens 768 --baseline-images 0 --latency-images 0)
step pages-7b-fp8 ${BENCH_LIMIT:-100} "${page[@]}" --images 256 --batch-sizes auto --quantization fp8
step pages-7b-bf16 ${BENCH_LIMIT:-100} "${page[@]}" --images 256 --batch-sizes auto --quantization none
exit 0
