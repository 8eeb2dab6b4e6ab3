#!/usr/bin/env bash
# Call Q4 (session 11, an H100; carry .whl; from a clean, committed tree): the FP8 cache's fp32 check again now
# that the kernel's dots run in IEEE float32 under a float32 model (Q1: 3 of 8 with TF32); batch 1 fp8 with
# and without the fp8 cache (the kernel's split-KV at one row); `--ask-after 12` with the scheduler's new
# victim rule (Q2: one ask waited 1.5 s for a wave's end).  Predictions: NOTES "Call Q4".
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
step verify-fp32-kvfp8 ${VERIFY_LIMIT:-90} bench --verify --load-format dummy --new-tokens 128 --kv-cache-dtype fp8
b1=(bench --load-format dummy --ignore-eos --images 2 --batch-sizes '' --baseline-images 0 --latency-images 3
    --quantization fp8)
step batch1-fp8-kvfp8 ${B1_LIMIT:-70} "${b1[@]}" --kv-cache-dtype fp8
step batch1-fp8 ${B1_LIMIT:-70} "${b1[@]}"
ttft ttft-full --ask-after 12
exit 0
