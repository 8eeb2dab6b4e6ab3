#!/usr/bin/env bash
# Issue 12 device call: the fp32 exactness check, then the two workloads with
# `auto` (plus the batch-1 latency setup each bench includes).  Run from the
# repository root of the copy on the device; wheels for what the image lacks
# (wcmatch, bracex) in .whl/.  Each step has its own timeout; logs and tables
# go to $OUT (at most 8 files come back).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-/tmp/vlwatch-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv > "$OUT/nvidia-smi.txt"
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)' | tee -a "$OUT/nvidia-smi.txt"
step() { local name=$1 limit=$2; shift 2; echo "+ vlwatch $*" | tee "$OUT/$name.log"; timeout "$limit" python3 -m daemon -v "$@" 2>&1 | tee -a "$OUT/$name.log"; echo "exit ${PIPESTATUS[0]}" | tee -a "$OUT/$name.log"; }
[[ ${SKIP_VERIFY:-} ]] || step verify 180 bench --verify --load-format dummy --new-tokens 128
step bench-1036 200 bench --load-format dummy --ignore-eos --images 256 --batch-sizes ${BATCHES:-auto} --baseline-images 1 --latency-images 3
step bench-page 230 bench --load-format dummy --ignore-eos --size 1008x1288 --new-tokens 768 --images 256 --batch-sizes ${BATCHES:-auto} --baseline-images 1 --latency-images 1
