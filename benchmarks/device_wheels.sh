#!/usr/bin/env bash
# Fill .whl/ (ignored) with what the device's Python lacks for `vlwatch bench`, the daemon and api_ttft.py:
# the device has torch 2.11, transformers 5.17 and their needs (numpy, pillow, pyyaml, tqdm, jinja2, packaging,
# huggingface_hub, ...: KINDS.md's pip list), Python 3.12 and no network. Pure wheels mostly; the few compiled
# ones are fetched for cp312 manylinux. Carry `.whl` on the call; benchmarks/device_env.sh installs them aside.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
    qwen-vl-utils==0.0.14 pypdfium2 wcmatch bracex watchdog 'apscheduler>=3.11,<4' tzlocal argcomplete \
    fastapi annotated-doc starlette pydantic pydantic-core annotated-types typing-inspection typing-extensions \
    anyio idna h11 'httpx<1' httpcore certifi uvicorn click python-multipart markdown-it-py mdurl \
    requests urllib3 charset-normalizer opentelemetry-api
du -sh .whl && ls .whl
# .whl525/: transformers 5.25 and what it needs beyond the device's (huggingface_hub 2.4 ...), for issue 22.4's
# "the engine on the device against 5.17 and 5.25": `with_transformers_525` in device_env.sh installs them.
grep -qx '/.whl525/' .git/info/exclude || echo /.whl525/ >> .git/info/exclude
mkdir -p .whl525
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl525 \
    transformers==5.25.0 huggingface_hub==2.4.0 hf-xet httpx2 httpcore2 kernels==0.19.1 filelock fsspec regex \
    tomlkit truststore typer rich pygments shellingham
du -sh .whl525
