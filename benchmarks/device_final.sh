#!/usr/bin/env bash
# Lead's call on nvidia-h100-x2 after the issue 12/13 changes: the fp32 exactness check on one card,
# then one engine vs one engine per GPU (benchmarks/device_engines_x2.sh), same run.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-/tmp/vlwatch-out}
mkdir -p "$OUT"
echo "+ vlwatch bench --verify --load-format dummy --new-tokens 128" | tee "$OUT/verify.log"
CUDA_VISIBLE_DEVICES=0 timeout 200 python3 -m daemon -v bench --verify --load-format dummy --new-tokens 128 2>&1 | tee -a "$OUT/verify.log"
echo "exit ${PIPESTATUS[0]}" | tee -a "$OUT/verify.log"
bash benchmarks/device_engines_x2.sh
