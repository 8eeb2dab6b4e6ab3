#!/usr/bin/env bash
# Call Q3 (ran at 191d52c, session 11: the VEC kernel and --vec-only were removed after it; an H100; carry .whl): the CUDA-core FP8 kernel (fp8_gemv's VEC path,
# no tensor-core tile for one to four rows) against the tensor-core kernel with split auto, one decoder layer of
# the 7B and of the 3B, 1, 2 and 4 rows.  Predictions: NOTES "Call Q3".
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
for model in 7b 3b; do
    (timeout ${PROBE_LIMIT:-150} python3 benchmarks/fp8_gemv_probe.py --vec-only --model $model --out "$OUT/$model" 2>&1 \
        | grep -v -i warn) | tee "$OUT/fp8-vec-probe-$model.log"
done
exit 0
