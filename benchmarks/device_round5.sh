#!/usr/bin/env bash
# Call G2 (issue 22.1's throughput condition): this tree against .base/ (main at 7858152, the figures in
# issue 22's table), same machine, same call, in the order new base new base: 1036x1036/256 with batch-1
# latency, then document pages 1008x1288/768.
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
img=(bench --load-format dummy --ignore-eos --images 256 --batch-sizes auto --baseline-images 0 --latency-images 3)
page=(bench --load-format dummy --ignore-eos --size 1008x1288 --new-tokens 768 --images 256 --batch-sizes auto
      --baseline-images 0 --latency-images 0)
tree() {  # tree NAME DIR LOG ARGS...: vlwatch ARGS from the tree in DIR
    local name=$1 dir=$2 log=$3; shift 3
    echo "+ ($name) vlwatch $*" | tee "$OUT/$log.log"
    (cd "$dir" && PYTHONPATH=/tmp/site:$dir timeout ${BENCH_LIMIT:-130} python3 -m daemon "$@" 2>&1 \
        | tee -a "$OUT/$log.log"; echo "exit ${PIPESTATUS[0]}" | tee -a "$OUT/$log.log")
}
for what in img page; do
    for name in new base; do
        dir=$PWD; [[ $name == base ]] && dir=$PWD/.base
        if [[ $what == img ]]; then args=("${img[@]}"); else args=("${page[@]}"); fi
        # The base's bench has no --ignore-eos: it always ran to the token budget (what the flag asks of the new one).
        [[ $name == base ]] && args=("${args[@]/--ignore-eos}")
        tree $name "$dir" "$what-$name" ${args[@]}
    done
done
exit 0
