#!/usr/bin/env bash
# Call K2 (next session, an H100; carry .whl): issue 23's rows not yet measured on an H100, fp8 with the few-row
# kernel and expandable segments: whole card 1036x1036/256 and pages 1008x1288/768 against bf16 in the same
# call, 7B fp8 pages under 22 GiB, the 3B in fp8 under 12 GiB with batch 1; first the fp32 verify owed after
# session 5's last engine changes (the starved counter, the FP8 option: no arithmetic). Predictions: NOTES "Call K2".
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
img=(bench --load-format dummy --ignore-eos --images 256 --batch-sizes auto --baseline-images 0 --latency-images 0)
page=(bench --load-format dummy --ignore-eos --size 1008x1288 --new-tokens 768 --images 256 --batch-sizes auto
      --baseline-images 0 --latency-images 0)
[ -n "${SKIP_VERIFY:-}" ] || step verify-fp32 ${VERIFY_LIMIT:-80} bench --verify --load-format dummy --new-tokens 128
step img-7b-fp8 ${BENCH_LIMIT:-75} "${img[@]}" --quantization fp8
step pages-7b-fp8 ${BENCH_LIMIT:-100} "${page[@]}" --quantization fp8
step pages-7b-bf16 ${BENCH_LIMIT:-100} "${page[@]}" --quantization none
step pages-7b-fp8-22g ${BENCH_LIMIT:-100} bench --load-format dummy --ignore-eos --size 1008x1288 --new-tokens 768 \
    --images 128 --batch-sizes '' --baseline-images 0 --latency-images 0 --quantization fp8 --max-gpu-memory 22GiB
step 3b-fp8-12g ${BENCH_LIMIT:-80} bench --load-format dummy --ignore-eos --images 256 --batch-sizes '' \
    --baseline-images 0 --latency-images 3 --model Qwen/Qwen2.5-VL-3B-Instruct --quantization fp8 --max-gpu-memory 12GiB
exit 0
