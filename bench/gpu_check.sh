#!/usr/bin/env bash
# One prepared device run (see bench/README.md): the GPU benchmarks and the GPU tests.
# Installs nothing but carried wheels (zarr & co. travel as .whl/); writes results under $OUT.
#   bash bench/gpu_check.sh [BASE_MODES] [MID_MODES]
# The end-to-end gpu-base comparison runs first, so that a run cut short still has it.
set -uo pipefail
OUT=${OUT:-bench/results}
BASE_MODES=${1:-plain,watch,stacked,watch10,layerwise,lowrank,paper}
MID_MODES=${2:-plain,watch,watch10,layerwise,lowrank,paper}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
nvidia-smi --query-gpu=name,memory.total --format=csv
python3 -m bench --config gpu-base --device cuda --modes "$BASE_MODES" --profile 3 --out "$OUT" 2>&1
python3 -m pytest -q -m gpu tests/gpu -p no:cacheprovider 2>&1 | tee "$OUT/gpu-tests.log"
# The row products alone, as the monitor runs them and in variants (split-K, layers batched).
python3 -m bench.products --config gpu-base --device cuda --out "$OUT" 2>&1
if [ "$MID_MODES" != "none" ]; then
  # Is gpu-mid bound by the host's Python and launches (then CUDA graphs are the lever)? The
  # profile (torch's tables and the training thread's cProfile) says where its host time goes.
  python3 -m bench --config gpu-mid --device cuda --modes "$MID_MODES" --no-accuracy \
    --profile 3 --out "$OUT" 2>&1
fi
