# Sourced by the device scripts: the wheels that travel with the call installed aside, the repository on
# the path, $OUT made, the machine noted, and step NAME LIMIT ARGS... running `vlwatch ARGS` into $OUT/NAME.log
# (ttft: api_ttft.py the same way).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-/tmp/vlwatch-out}
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total,compute_cap --format=csv,noheader
  python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'; } | tee "$OUT/machine.txt"
step() { local name=$1 limit=$2; shift 2; echo "+ vlwatch $*" | tee "$OUT/$name.log"
         timeout "$limit" python3 -m daemon "$@" 2>&1 | tee -a "$OUT/$name.log"; echo "exit ${PIPESTATUS[0]}" | tee -a "$OUT/$name.log"; }
# ttft [NAME [ARGS...]]: benchmarks/api_ttft.py (a 1200-image backlog, 20 asks of 32 tokens, then ARGS) into
# $OUT/NAME.log and $OUT/NAME/ (NAME defaults to ttft).
ttft() { local name=${1:-ttft}; shift || true
         echo "+ python benchmarks/api_ttft.py --backlog ${BACKLOG:-1200} --requests 20 --gap 0.25 $*" | tee "$OUT/$name.log"
         mkdir -p "$OUT/$name"
         timeout ${TTFT_LIMIT:-230} python3 benchmarks/api_ttft.py --backlog ${BACKLOG:-1200} --requests 20 --gap 0.25 \
             --images /tmp/backlog --out "$OUT/$name" "$@" 2>&1 | tee -a "$OUT/$name.log"
         gzip -f "$OUT/$name/api_ttft-daemon.log" 2>/dev/null; }
# with_transformers_525: the steps after it import transformers 5.25 (carry .whl525 too; device_wheels.sh fills it).
with_transformers_525() {
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site525 \
        .whl525/*.whl || return 1
    export PYTHONPATH=/tmp/site525:$PYTHONPATH
    python3 -c 'import transformers; print("now transformers", transformers.__version__)' | tee -a "$OUT/machine.txt"; }
