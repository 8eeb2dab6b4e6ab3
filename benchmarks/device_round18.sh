#!/usr/bin/env bash
# Call M3 (after M2, same machine if warm; carry .whl): issue 23's capped rows.  First the 7B fp8 pages under
# 22 GiB (71 slots) with the few-row kernel up to 16 rows (the default: 71 rows take _scaled_mm) and up to 128
# (its 128-row tile), same call; then the rows not yet measured on an H100: the 7B fp8 under 16 GiB (pages) and
# 12 GiB (images: "runs, figure reported"), the 3B fp8 under 8 GiB (pages).  Predictions: NOTES "Call M3".
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
page=(bench --load-format dummy --ignore-eos --size 1008x1288 --new-tokens 768 --baseline-images 0 --latency-images 0)
step pages-7b-fp8-22g ${BENCH_LIMIT:-100} "${page[@]}" --images 128 --batch-sizes '' --quantization fp8 --max-gpu-memory 22GiB
step pages-7b-fp8-22g-rows128 ${BENCH_LIMIT:-100} "${page[@]}" --images 128 --batch-sizes '' --quantization fp8 \
    --max-gpu-memory 22GiB --engine fp8_rows_max=128
step pages-7b-fp8-16g ${BENCH_LIMIT:-100} "${page[@]}" --images 64 --batch-sizes '' --quantization fp8 --max-gpu-memory 16GiB
step img-7b-fp8-12g ${BENCH_LIMIT:-80} bench --load-format dummy --ignore-eos --images 64 --batch-sizes '' \
    --baseline-images 0 --latency-images 0 --quantization fp8 --max-gpu-memory 12GiB
step pages-3b-fp8-8g ${BENCH_LIMIT:-100} "${page[@]}" --images 64 --batch-sizes '' --model Qwen/Qwen2.5-VL-3B-Instruct \
    --quantization fp8 --max-gpu-memory 8GiB
exit 0
