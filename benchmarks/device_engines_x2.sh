#!/usr/bin/env bash
# Issue 12.5 device call on nvidia-h100-x2: one engine vs one engine per GPU, same run.
# --devices auto: engine 0 in the bench's process, engine 1 in a process of its own (spawn), as the
# daemon runs them; the child imports what an engine needs only (no watchdog on the device machine).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/vlwatch-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=index,name,memory.total --format=csv > "$OUT/nvidia-smi.txt"
cmd=(bench --load-format dummy --ignore-eos --images 512 --batch-sizes auto --baseline-images 1 --latency-images 1 --devices auto)
echo "+ vlwatch ${cmd[*]}" | tee "$OUT/bench-x2.log"
timeout 500 python3 -m daemon -v "${cmd[@]}" 2>&1 | tee -a "$OUT/bench-x2.log"
echo "exit ${PIPESTATUS[0]}" | tee -a "$OUT/bench-x2.log"
