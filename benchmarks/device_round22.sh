#!/usr/bin/env bash
# Call P3 (session 10, an H100; carry .whl; from a clean, committed tree): issue 23's capped rows with the FP8
# KV cache, after P1 showed it wins under 22 GiB (387.4 vs 298.7 pages/min). Predictions: NOTES "Call P3".
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
img=(bench --load-format dummy --ignore-eos --baseline-images 0 --latency-images 0 --batch-sizes ''
     --quantization fp8 --kv-cache-dtype fp8)
page=("${img[@]}" --size 1008x1288 --new-tokens 768)
step img-7b-fp8-22g-kvfp8 ${LIMIT:-100} -v "${img[@]}" --images 256 --max-gpu-memory 22GiB
step pages-7b-fp8-16g-kvfp8 ${LIMIT:-100} -v "${page[@]}" --images 128 --max-gpu-memory 16GiB
step img-7b-fp8-16g-kvfp8 ${LIMIT:-100} -v "${img[@]}" --images 256 --max-gpu-memory 16GiB
step pages-3b-fp8-8g-kvfp8 ${LIMIT:-100} -v "${page[@]}" --images 128 --max-gpu-memory 8GiB \
    --model Qwen/Qwen2.5-VL-3B-Instruct
step img-3b-fp8-8g-kvfp8 ${LIMIT:-90} -v "${img[@]}" --images 256 --max-gpu-memory 8GiB \
    --model Qwen/Qwen2.5-VL-3B-Instruct
exit 0
