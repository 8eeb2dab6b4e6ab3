#!/usr/bin/env bash
# One A/B on one machine (METHOD.md: compare only within a call): the same
# `vlwatch bench` with and without an environment switch, in the order A B.
#   SWITCH=VLWATCH_PACKED_PREFILL=0 NAME=packed bash benchmarks/device_ab.sh --images 256 ...
# Logs go to $OUT/ab-$NAME-{default,switched}.log.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-/tmp/vlwatch-out}
mkdir -p "$OUT"
for run in ${ORDER:-default switched}; do
    log="$OUT/ab-${NAME:-x}-$run.log"
    if [[ $run == switched ]]; then env=("$SWITCH"); else env=(); fi
    echo "+ ${env[*]} vlwatch bench --load-format dummy --ignore-eos $*" | tee "$log"
    env "${env[@]}" timeout "${LIMIT:-220}" python3 -m daemon bench --load-format dummy --ignore-eos "$@" 2>&1 | tee -a "$log"
done
