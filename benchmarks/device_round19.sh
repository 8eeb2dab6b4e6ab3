#!/usr/bin/env bash
# Call N5 (session 8, an H100; carry .whl; run from a clean, committed tree): after the FP8 KV cache went in.
# 1. fp32 bench --verify (the default path: the cache write now goes through decode_step.store);
# 2. 7B fp8 pages 1008x1288/768 under 22 GiB: the KV cache in bf16 (71 slots) against fp8 (~137), same call.
# Predictions: NOTES "Call N5".
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
step verify-fp32 ${VERIFY_LIMIT:-80} bench --verify --load-format dummy --new-tokens 128
page=(bench --load-format dummy --ignore-eos --size 1008x1288 --new-tokens 768 --baseline-images 0 --latency-images 0
      --images ${PAGES:-128} --batch-sizes '' --quantization fp8 --max-gpu-memory 22GiB)
step pages-7b-fp8-22g ${BENCH_LIMIT:-95} "${page[@]}"
step pages-7b-fp8-22g-kvfp8 ${BENCH_LIMIT:-95} "${page[@]}" --kv-cache-dtype fp8
exit 0
