#!/usr/bin/env bash
# Call R5 (an H100; carry .whl; from a clean, committed tree; after R4): engine.fp8_widen: bits in the FP8 KV
# cache's kernel.  1. the fp32 check with the fp8 cache, bits (the converting kernel gave 7 of 8, 224x224 parting
# at token 57, in session 11: the same numbers should part at the same place); 2. whole card, 1036 px / 256
# tokens, 512 images, fp8 weights and fp8 cache, bits against convert in one call (session 11: 1,112.5 images/min
# with convert).  Predictions: NOTES "Call R5".
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
step verify-fp32-kvfp8-bits ${VERIFY_LIMIT:-110} bench --verify --load-format dummy --new-tokens 128 \
    --kv-cache-dtype fp8 --engine fp8_widen=bits
img=(bench --load-format dummy --ignore-eos --baseline-images 0 --latency-images 0 --batch-sizes auto --quantization fp8
     --images 512 --kv-cache-dtype fp8)
step img-7b-fp8-full-kvfp8-bits ${LIMIT:-110} -v "${img[@]}" --engine fp8_widen=bits
step img-7b-fp8-full-kvfp8-convert ${LIMIT:-110} -v "${img[@]}"
exit 0
