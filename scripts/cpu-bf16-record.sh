#!/usr/bin/env bash
# The bf16 record of bench/results/cpu.md ("bf16"), about 12 minutes on the 2-core machine.
set -eux
cd "$(dirname "$0")/.."
A=${ATTNKIT:-.venv/bin/attnkit}
$A bench --dtype bfloat16 --n 1024..8192 --backends numba,torch-sdpa-flash --rounds 2 --out bench/results/cpu-bf16/d64
$A bench --dtype bfloat16 --n 1024..8192 --head-dim 128 --causal --backends numba,torch-sdpa-flash --rounds 2 --out bench/results/cpu-bf16/d128-causal
$A bench --dtype bfloat16 --n 1024..8192 --causal --backends numba,torch-sdpa-flash --rounds 2 --out bench/results/cpu-bf16/d64-causal
$A bench --dtype bfloat16 --n 1024..8192 --head-dim 128 --backends numba,torch-sdpa-flash --rounds 2 --out bench/results/cpu-bf16/d128
$A bench --dtype bfloat16 --n 2048 --heads 32 --kv-heads 8 --head-dim 128 --causal --backends numba,torch-sdpa-flash --rounds 2 --out bench/results/cpu-bf16/gqa
$A bench --dtype bfloat16 --n 1024..4096 --causal --mode backward --backends numba,torch-sdpa-flash --rounds 2 --out bench/results/cpu-bf16/d64-causal-backward
$A bench --dtype bfloat16 --n 1024..4096 --causal --mode both --backends numba,torch-sdpa-flash --rounds 2 --out bench/results/cpu-bf16/d64-causal-both
{ echo "# python -m attnkit.bench.cpu_dtypes --rounds 5   ($(date -u +%F), $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores)"
  .venv/bin/python -m attnkit.bench.cpu_dtypes --rounds 5; } | tee bench/results/cpu-dtypes.txt
