#!/bin/sh
# The device machine's entry point for bench/gpu.py (read its docstring): installs the wheels carried in .gpu/
# (bench/gpu_carry.py) into a folder of their own, puts it first on PYTHONPATH, and runs bench/gpu.py with the
# arguments given. That machine reaches no package index, so nothing else is installed.
#
#   bash bench/gpu.sh --out "$OUT"          PYTHON (default python3) picks the interpreter
set -eu
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
site=${GPU_SITE:-/tmp/hatchway-gpu-site}
mkdir -p "$site"
"$python" -m pip install --quiet --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
	--upgrade --target "$site" .gpu/wheels/*.whl
# The checkout too: its server, agent and proto packages are not installed there.
PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 exec "$python" bench/gpu.py "$@"
