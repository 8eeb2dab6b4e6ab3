#!/usr/bin/env bash
# Call J5 (H100): 1. api_ttft.py again (J1's run lost its daemon to a missing wheel, opentelemetry-api, now
# carried), the daemon with expandable segments; 2. 7B fp8 pages 1008x1288/768 under 22 GiB (issue 23: >= 350);
# 3. batch 1 fp8 with the sweep's tiles. Predictions: NOTES "Call J5".
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
ttft
step pages-7b-fp8-22g ${PAGES_LIMIT:-110} bench --load-format dummy --ignore-eos --size 1008x1288 --new-tokens 768 \
    --images 128 --batch-sizes '' --baseline-images 0 --latency-images 0 --quantization fp8 --max-gpu-memory 22GiB
step batch1-fp8 ${B1_LIMIT:-75} bench --load-format dummy --ignore-eos --images 2 --batch-sizes '' --baseline-images 0 \
    --latency-images 3 --quantization fp8
exit 0
