# Sourced by the device scripts: the wheels that travel with the call installed aside, the repository on
# the path, $OUT made, the machine noted, and step NAME LIMIT ARGS... running `vlwatch ARGS` into $OUT/NAME.log.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-/tmp/vlwatch-out}
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total,compute_cap --format=csv,noheader
  python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'; } | tee "$OUT/machine.txt"
step() { local name=$1 limit=$2; shift 2; echo "+ vlwatch $*" | tee "$OUT/$name.log"
         timeout "$limit" python3 -m daemon "$@" 2>&1 | tee -a "$OUT/$name.log"; echo "exit ${PIPESTATUS[0]}" | tee -a "$OUT/$name.log"; }
