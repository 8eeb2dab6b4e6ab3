#!/usr/bin/env bash
# One A/B on one machine (METHOD.md: compare only within a call): the same
# `vlwatch bench` with and without engine options (the config's engine:
# section, given as `--engine KEY=VALUE`), in the order A B.
#   SWITCH="packed_prefill=false" NAME=packed bash benchmarks/device_ab.sh --images 256 ...
#   SWITCH="compile=[decode] decode_attention=sdpa" NAME=two bash benchmarks/device_ab.sh ...
# Logs go to $OUT/ab-$NAME-{default,switched}.log.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-/tmp/vlwatch-out}
mkdir -p "$OUT"
for run in ${ORDER:-default switched}; do
    log="$OUT/ab-${NAME:-x}-$run.log"
    options=()
    if [[ $run == switched ]]; then
        for pair in $SWITCH; do options+=(--engine "$pair"); done
    fi
    echo "+ vlwatch bench --load-format dummy --ignore-eos ${options[*]} $*" | tee "$log"
    timeout "${LIMIT:-220}" python3 -m daemon bench --load-format dummy --ignore-eos "${options[@]}" "$@" 2>&1 | tee -a "$log"
done
