#!/usr/bin/env bash
# Call R1 (next session, an H100; carry .whl; from a clean, committed tree): the few-row FP8 kernel against
# cuBLAS bf16 as the decode step runs them (inside a CUDA graph, weights cold), 7B and 3B layers, 1-16 rows:
# what call Q3's host-timed probe could not say about q/k/v and o.  Predictions: NOTES "Call R1".
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
for model in 7b 3b; do
    (timeout ${PROBE_LIMIT:-150} python3 benchmarks/fp8_layer_graph.py --model $model --out "$OUT/$model" 2>&1 \
        | grep -v -i warn) | tee "$OUT/fp8-layer-graph-$model.log"
done
exit 0
