#!/usr/bin/env bash
# Call J3: the FP8 plan under a cap (issue 23). Session 4's 7B fp8 at max_gpu_memory 22GiB planned 104 slots, ran
# out of memory, halved to 52 and settled at 96 (peak 21.99 GiB). The out-of-memory warning now says where and
# what torch asked for; the log's "memory plan" line says what the plan counted. Then 16 GiB (not run since F1).
# Predictions: NOTES "Call J3".
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
capped=(bench --load-format dummy --ignore-eos --images 256 --batch-sizes '' --baseline-images 0 --latency-images 0
        --quantization fp8 --verbose)
step bench-7b-fp8-22g ${BENCH_LIMIT:-120} "${capped[@]}" --max-gpu-memory 22GiB
step bench-7b-fp8-16g ${BENCH_LIMIT:-120} "${capped[@]}" --max-gpu-memory 16GiB
exit 0
