#!/usr/bin/env bash
# Call P4 (session 10, an H100; carry .whl; from a clean, committed tree): P3's 22 GiB images with the FP8
# cache (193 slots) made 620 images/min on 256 images, 1.3 waves; 512 images both caches in one call, then
# the whole card's pages with fp8 weights and the fp8 cache. Predictions: NOTES "Call P4".
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
img=(bench --load-format dummy --ignore-eos --baseline-images 0 --latency-images 0 --batch-sizes '' --quantization fp8)
step img-7b-fp8-22g-kvfp8-512 ${LIMIT:-100} -v "${img[@]}" --images 512 --max-gpu-memory 22GiB --kv-cache-dtype fp8
step img-7b-fp8-22g-512 ${LIMIT:-100} -v "${img[@]}" --images 512 --max-gpu-memory 22GiB
step pages-7b-fp8-full-kvfp8 ${LIMIT:-110} -v "${img[@]}" --size 1008x1288 --new-tokens 768 --images 256 --kv-cache-dtype fp8
exit 0
