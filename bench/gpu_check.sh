#!/usr/bin/env bash
# One prepared device run (see bench/README.md): GPU tests, then the GPU benchmark.
# Installs nothing but carried wheels (zarr & co. travel as .whl/); writes results under $OUT.
set -uo pipefail
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -m pytest -q -m gpu tests/gpu 2>&1 | tee "$OUT/gpu-tests.log"
python3 -m bench --config gpu-base --device cuda --out "$OUT" 2>&1 | tee "$OUT/gpu-bench.log"
