#!/usr/bin/env bash
# One device call (benchmarks/NOTES.md): environment, the probe, then the bench.
# Usage on the device machine, from the repository root, after installing the
# carried wheels into /tmp/site:  bash benchmarks/device_run.sh [probe|bench|both] [bench args...]
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-/tmp/vlwatch-out}
mkdir -p "$OUT"
what=${1:-both}; shift || true
nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv | tee "$OUT/nvidia-smi.txt"
if [[ $what == probe || $what == both ]]; then
    timeout 330 python3 benchmarks/probe.py --out "$OUT" ${PROBE_SKIP:+--skip "$PROBE_SKIP"} 2>&1 | tee "$OUT/probe.log"
fi
if [[ $what == bench || $what == both ]]; then
    args=("$@")
    [[ ${#args[@]} -gt 0 ]] || args=(--load-format dummy --images 128 --batch-sizes auto,32 --max-gpu-memory 22GiB)
    timeout ${BENCH_TIMEOUT:-420} python3 -m daemon -v bench "${args[@]}" --save "$OUT" 2>&1 | tee -a "$OUT/bench.log"
fi
