#!/usr/bin/env bash
# Call R3 (an H100; carry .whl; from a clean, committed tree): issue 23's 12 GiB rows, not run on an H100 since
# session 6 (3B images, bf16 cache: 997.7 against >= 1,000): the 7B in fp8 ("runs, figure reported") and the
# 3B in fp8 (>= 1,000 images/min, >= 400 pages/min, batch 1 <= 0.7 s), each with the FP8 KV cache and, for
# the 1036 px images, with the bf16 cache beside it.  Predictions: NOTES "Call R3".
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
base=(bench --load-format dummy --ignore-eos --baseline-images 0 --latency-images 0 --batch-sizes '' --quantization fp8)
img=("${base[@]}" --max-gpu-memory 12GiB)
page=("${img[@]}" --size 1008x1288 --new-tokens 768)
b3=(--model Qwen/Qwen2.5-VL-3B-Instruct)
step img-3b-fp8-12g-kvfp8 ${LIMIT:-90} -v "${img[@]}" "${b3[@]}" --images 256 --kv-cache-dtype fp8
step img-3b-fp8-12g ${LIMIT:-90} -v "${img[@]}" "${b3[@]}" --images 256
step pages-3b-fp8-12g-kvfp8 ${LIMIT:-100} -v "${page[@]}" "${b3[@]}" --images 128 --kv-cache-dtype fp8
step batch1-3b-fp8 ${LIMIT:-70} bench --load-format dummy --ignore-eos --images 2 --batch-sizes '' --baseline-images 0 \
    --latency-images 3 --quantization fp8 "${b3[@]}"
step img-7b-fp8-12g-kvfp8 ${LIMIT:-100} -v "${img[@]}" --images 64 --kv-cache-dtype fp8
step pages-7b-fp8-12g-kvfp8 ${LIMIT:-100} -v "${page[@]}" --images 32 --kv-cache-dtype fp8
exit 0
