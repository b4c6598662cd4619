#!/usr/bin/env bash
# On the GPU machine (bare, no network): install the wheels bench/gpu_prepare.sh put in .whl/ and
# this package on the torch found there, check the torch APIs we rely on (tests/test_torch_api.py),
# then run bench/gpu_check.py into $OUT. Arguments go to gpu_check.py:
#
#     bash bench/gpu_run.sh --quick
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
ls .whl/*.whl >/dev/null 2>&1 || { echo "error: no wheels in .whl/: run bash bench/gpu_prepare.sh first and carry .whl"; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
# --no-build-isolation: setuptools from the machine (no network for an isolated build environment).
# Should it fail there (an old setuptools without `wheel`), run from the working tree instead: every
# entry point imports quant itself, so only the plugin entry point is missing, which nothing here needs.
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || {
    echo "warning: pip install -e . failed: running from the working tree (PYTHONPATH)"
    export PYTHONPATH=$PWD:/tmp/site
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python3 -m pytest -q -p no:cacheprovider tests/test_torch_api.py 2>&1 | tail -3
python3 bench/gpu_check.py "$@" --out "$OUT" 2>&1 | tee "$OUT/console.txt"
exit "${PIPESTATUS[0]}"
