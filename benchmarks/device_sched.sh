#!/usr/bin/env bash
# Call S1 (issue 22): an interactive ask's latency under a 1200-image folder backlog, this tree
# against .base/ (an older tree copied in, ignored by git, carried with the call), same script.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/vlwatch-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/machine.txt"
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)' | tee -a "$OUT/machine.txt"
args=(--backlog ${BACKLOG:-1200} --requests ${REQUESTS:-20} --gap ${GAP:-0.25} --images /tmp/backlog)
cp benchmarks/api_ttft.py .base/benchmarks/api_ttft.py
for tree in ${TREES:-new base}; do
    dir=$PWD; [[ $tree == base ]] && dir=$PWD/.base
    mkdir -p "$OUT/$tree"
    echo "+ ($tree) python benchmarks/api_ttft.py ${args[*]}" | tee "$OUT/ttft-$tree.log"
    (cd "$dir" && PYTHONPATH=/tmp/site:$dir timeout ${TTFT_LIMIT:-210} python3 benchmarks/api_ttft.py "${args[@]}" \
        --out "$OUT/$tree" 2>&1 | grep -v "tokenizer you are loading" | tee -a "$OUT/ttft-$tree.log")
    gzip -f "$OUT/$tree/api_ttft-daemon.log" 2>/dev/null
done
if [[ -z ${SKIP_VERIFY:-} ]]; then
    echo "+ vlwatch bench --verify --load-format dummy --new-tokens 128" | tee "$OUT/verify.log"
    PYTHONPATH=/tmp/site:$PWD timeout ${VERIFY_LIMIT:-150} python3 -m daemon bench --verify --load-format dummy --new-tokens 128 2>&1 \
        | grep -v "tokenizer you are loading" | tee -a "$OUT/verify.log"
fi
