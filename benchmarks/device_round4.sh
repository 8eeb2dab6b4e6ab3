#!/usr/bin/env bash
# Call G1 (issue 23): FP8 shown correct (the kernel call by call, the forward against its bf16 floor,
# the fused engine token for token in fp32) and the capped targets: 7B fp8 under 22 GiB, 3B fp8
# under 12 and 8 GiB, 3B fp8 batch 1, 7B fp8 under 12 GiB (one prompt per prefill round). Then bf16 fp32 verify (nothing in the bf16 path changed).
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
echo "+ benchmarks/fp8_check.py" | tee "$OUT/fp8-check.log"
timeout ${CHECK_LIMIT:-100} python3 benchmarks/fp8_check.py --load-format dummy --new-tokens 48 --out "$OUT" 2>&1 | tee -a "$OUT/fp8-check.log"
step verify-fp32 ${VERIFY_LIMIT:-110} bench --verify --load-format dummy --new-tokens 128
step verify-fp32-fp8 ${VERIFY_LIMIT:-110} bench --verify --load-format dummy --new-tokens 128 --quantization fp8
capped=(bench --load-format dummy --ignore-eos --images ${IMAGES:-256} --batch-sizes '' --baseline-images 0 --latency-images 0)
step bench-7b-fp8-22g ${BENCH_LIMIT:-95} "${capped[@]}" --quantization fp8 --max-gpu-memory 22GiB
step bench-7b-fp8-12g ${BENCH_LIMIT:-95} "${capped[@]}" --quantization fp8 --max-gpu-memory 12GiB
step bench-3b-fp8-12g ${BENCH_LIMIT:-80} "${capped[@]}" --latency-images 3 --model Qwen/Qwen2.5-VL-3B-Instruct --quantization fp8 --max-gpu-memory 12GiB
step bench-3b-fp8-8g ${BENCH_LIMIT:-80} "${capped[@]}" --model Qwen/Qwen2.5-VL-3B-Instruct --quantization fp8 --max-gpu-memory 8GiB
exit 0
