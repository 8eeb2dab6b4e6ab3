#!/usr/bin/env bash
# Call R1 (next session, an H100; carry .whl; from a clean, committed tree): the few-row FP8 kernel against
# cuBLAS bf16 as the decode step runs them (inside a CUDA graph, weights cold), 7B and 3B layers, 1-16 rows:
# what call Q3's host-timed probe could not say about q/k/v and o.  For the 7B, then every tile of the sweep
# at one row (batch 1), for at most SWEEP_SECONDS.  Predictions: NOTES "Call R1".
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
(timeout ${PROBE_LIMIT:-330} python3 benchmarks/fp8_layer_graph.py --model 7b --out "$OUT/7b" \
    --sweep --sweep-rows 1 --sweep-seconds ${SWEEP_SECONDS:-170} 2>&1 | grep -v -i warn) | tee "$OUT/fp8-layer-graph-7b.log"
(timeout ${PROBE_LIMIT_3B:-150} python3 benchmarks/fp8_layer_graph.py --model 3b --out "$OUT/3b" 2>&1 \
    | grep -v -i warn) | tee "$OUT/fp8-layer-graph-3b.log"
exit 0
