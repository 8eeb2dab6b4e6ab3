#!/usr/bin/env bash
# Call F1 (issues 22, 23): after the scheduler, the reshape, the engine options and FP8 in the fused
# engine: the fp32 exactness check, the FP8 reference check, then 7B fp8 against 7B bf16 on the whole
# card (1036x1036/256, same call) and 7B fp8 under max_gpu_memory 16GiB (bf16 does not fit there).
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
step verify-fp32 ${VERIFY_LIMIT:-130} bench --verify --load-format dummy --new-tokens 128
echo "+ benchmarks/fp8_check.py" | tee "$OUT/fp8-check.log"
timeout ${CHECK_LIMIT:-100} python3 benchmarks/fp8_check.py --load-format dummy --new-tokens 48 --out "$OUT" 2>&1 | tee -a "$OUT/fp8-check.log"
common=(bench --load-format dummy --ignore-eos --images ${IMAGES:-256} --batch-sizes auto --baseline-images 0 --latency-images 0)
step bench-7b-fp8 ${BENCH_LIMIT:-110} "${common[@]}" --quantization fp8
step bench-7b-bf16 ${BENCH_LIMIT:-110} "${common[@]}" --quantization none
[[ -n ${SKIP_16G:-} ]] || step bench-7b-fp8-16g ${BENCH_LIMIT:-100} "${common[@]}" --quantization fp8 --max-gpu-memory 16GiB
exit 0
