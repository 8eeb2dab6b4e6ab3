#!/usr/bin/env bash
# Device call after merging issues 10-14: the fp32 exactness check of the engine
# (issue 12.6), then the API's time to first token on an idle engine vs one
# saturated by a folder backlog (issue 13).  Wheels for what the GPU image lacks
# (the daemon's own dependencies: watchdog, apscheduler, fastapi with
# opentelemetry-api, uvicorn, ...)
# travel in .whl/.  Logs go to $OUT.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-/tmp/vlwatch-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia-smi.txt"
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)' | tee -a "$OUT/nvidia-smi.txt"
if [[ -z ${SKIP_VERIFY:-} ]]; then
    echo "+ vlwatch bench --verify --load-format dummy --new-tokens 128" | tee "$OUT/verify.log"
    timeout 200 python3 -m daemon -v bench --verify --load-format dummy --new-tokens 128 2>&1 | tee -a "$OUT/verify.log"
    echo "exit ${PIPESTATUS[0]}" | tee -a "$OUT/verify.log"
fi
args=(--backlog ${BACKLOG:-400} --requests ${REQUESTS:-12} --gap ${GAP:-1.0} --out "$OUT")
echo "+ python benchmarks/api_ttft.py ${args[*]}" | tee "$OUT/api_ttft.log"
timeout ${TTFT_LIMIT:-330} python3 benchmarks/api_ttft.py "${args[@]}" 2>&1 | tee -a "$OUT/api_ttft.log"
echo "exit ${PIPESTATUS[0]}" | tee -a "$OUT/api_ttft.log"
