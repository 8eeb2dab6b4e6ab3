#!/usr/bin/env bash
# Call Q1 (next session, an H100; carry .whl; from a clean, committed tree): the GPU check the FP8 KV cache
# waits for before `kv_cache_dtype: auto` may take it, and the one issue-23 row not yet run with it.
# Predictions: NOTES "Call Q1".
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
# fp32, the engine's cache in e4m3 read by the Triton kernel, stock generate with stock.rounding_cache
step verify-fp32-kvfp8 ${VERIFY_LIMIT:-90} bench --verify --load-format dummy --new-tokens 128 --kv-cache-dtype fp8
step verify-fp32 ${VERIFY_LIMIT:-80} bench --verify --load-format dummy --new-tokens 128
img=(bench --load-format dummy --ignore-eos --baseline-images 0 --latency-images 0 --batch-sizes auto --quantization fp8
     --images 512)
# issue 22's one unmet figure: batch 1 in bf16 (J2, session 5: 1.582 s against <= 1.55)
step batch1-bf16 ${B1_LIMIT:-70} bench --load-format dummy --ignore-eos --images 2 --batch-sizes '' --baseline-images 0 \
    --latency-images 3 --quantization none
step img-7b-fp8-full-kvfp8 ${LIMIT:-110} -v "${img[@]}" --kv-cache-dtype fp8
step img-7b-fp8-full ${LIMIT:-110} -v "${img[@]}"
exit 0
