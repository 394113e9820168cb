#!/usr/bin/env bash
# Issue 13's device check: one call on a bare GPU machine that has torch but no network and
# no Ray. Prints one table (bench/bench_gpu.py): loader-only rate; model-only and end-to-end
# images/s and peak memory for fp32 / bf16 / bf16+compile at batch 128-1024; the per-epoch
# fixed cost of the real worker loop in its no-Ray local mode. Ends inside ~7 min (a budget
# skips rows rather than overrun). Without CUDA it runs the quick CPU variant.
#
# The device image lacks pydantic and webdataset: carry them as wheels in .whl/ (ignored),
# fetched here once (Python 3.12 on the device):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
#     typing-inspection==0.4.5 webdataset==1.0.2 braceexpand==0.1.7
# and run it with the device tool: command `bash bench/gpu.sh`, carry [".whl"].
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import pydantic, webdataset" 2>/dev/null; then
  [ -d .whl ] || { echo "pydantic/webdataset missing and no .whl/ folder: see the header" >&2; exit 2; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
exec timeout 470 "$PY" bench/bench_gpu.py --budget-s 420 "$@"
