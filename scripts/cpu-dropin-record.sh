#!/usr/bin/env bash
# The 2026-12-02 records of bench/results/cpu.md (float32 forward after the FMA
# micro-kernel, the drop-in calls) and bench/results/models.md; ~25 minutes on
# the 2-core machine. Run it on an otherwise idle machine: contenders take turns,
# but whole-model timings feel anything else running.
set -eux
cd "$(dirname "$0")/.."
A=${ATTNKIT:-.venv/bin/attnkit}
PY=${ATTNKIT_PYTHON_BIN:-.venv/bin/python}
$A bench --n 1024..8192 --backends numba,torch-sdpa-flash --rounds 2 --out bench/results/cpu-fp32-fma/d64
$A bench --n 1024..4096 --mode backward --backends numba,torch-sdpa-flash --rounds 2 --out bench/results/cpu-fp32-fma/d64-backward
$A bench --n 1024..4096 --head-dim 128 --mode backward --backends numba,torch-sdpa-flash --rounds 2 \
    --out bench/results/cpu-fp32-fma/d128-backward
$A bench --n 1024..8192 --head-dim 128 --causal --backends numba,torch-sdpa-flash --rounds 2 \
    --out bench/results/cpu-fp32-fma/d128-causal
header="($(date -u +%F), $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores)"
{ echo "# python -m attnkit.bench.cpu_dtypes --suite dropin --rounds 5   $header"
  $PY -m attnkit.bench.cpu_dtypes --suite dropin --rounds 5; } | tee bench/results/cpu-dropin.txt
{ echo "# python -m attnkit.bench.cpu_dtypes --rounds 5   $header"
  $PY -m attnkit.bench.cpu_dtypes --rounds 5; } | tee bench/results/cpu-dtypes.txt
{ echo "<!-- python -m attnkit.bench.models --rounds 3   $header -->"
  $PY -m attnkit.bench.models --rounds 3; } | tee bench/results/models-table.md
