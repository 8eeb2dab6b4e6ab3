#!/usr/bin/env bash
# Call P1 (next session, an H100; carry .whl; from a clean, committed tree): why N5's decode step with the FP8
# KV cache took ~22-27 ms at 128-136 rows where ~12 ms was predicted (NOTES "Calls N5 and N6").
# 1. the captured step and its kernels, 7B fp8 weights: the bf16 cache at 71 rows, the fp8 cache at 71 and 136,
#    plus the FP8 cache write compiled two ways (straight into float8, through uint8 views);
# 2. then the 22 GiB pages bench both ways with 256 pages (N6's sizes), if the step is fixed.
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
prof() { local name=$1; shift; echo "+ profile_decode.py $*" | tee "$OUT/$name.log"
         timeout ${PROF_LIMIT:-120} python3 benchmarks/profile_decode.py --out "$OUT/$name" --no-variants "$@" 2>&1 \
             | grep -v -e 'UserWarning' -e 'warnings.warn' | tee -a "$OUT/$name.log"; }
# (only Python's own warning lines are dropped: a "WARNING daemon..." line, a capture or a compile that fell back,
# is what P1 looks for)
prof profile-bf16kv --quantization fp8 --cases 71x2560x2300
prof profile-fp8kv --quantization fp8 --kv-cache-dtype fp8 --cases 71x2560x2300,136x2560x2300 --store-variants
page=(bench --load-format dummy --ignore-eos --size 1008x1288 --new-tokens 768 --baseline-images 0 --latency-images 0
      --images 256 --batch-sizes '' --quantization fp8 --max-gpu-memory 22GiB)
# -v: the engine's own line per run ("engine: N requests in T s: prefill P s, decode D s in K steps ...") splits
# the time between prefill and decode, which N6 could not.
step pages-7b-fp8-22g-kvfp8-256 ${BENCH_LIMIT:-110} -v "${page[@]}" --kv-cache-dtype fp8
step pages-7b-fp8-22g-256 ${BENCH_LIMIT:-110} -v "${page[@]}"
exit 0
