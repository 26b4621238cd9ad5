#!/usr/bin/env bash
# bench/results/cpu-targets.md's figures: attnkit against torch SDPA, taking turns in one process,
# with both compiled or limited for another CPU than this one. About 15 minutes on the 2-core machine.
#   AVX2 (Haswell .. Alder Lake, Zen 2/3): Numba targets haswell; torch's kernels, oneDNN and MKL limited to AVX2
#   AVX-512F without BF16 (Skylake-SP .. Tiger Lake): Numba targets skylake-avx512 with an explicit feature list
#   native: whatever this CPU is
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-bench/results/cpu-targets}
mkdir -p "$OUT"
AVX2=+avx,+avx2,+fma,+sse4.2,+popcnt,+bmi2,+f16c
AVX512=$AVX2,+avx512f,+avx512bw,+avx512dq,+avx512vl,+avx512cd
header() { echo "# $1   ($(date -u +%F), $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores)"; }

{ header "NUMBA_CPU_NAME=haswell NUMBA_CPU_FEATURES=$AVX2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 python -m attnkit.bench.cpu_dtypes --suite targets --rounds 5"
  NUMBA_CACHE_DIR=$HOME/.cache/attnkit-targets/haswell NUMBA_CPU_NAME=haswell NUMBA_CPU_FEATURES=$AVX2 \
  ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
  $PY -m attnkit.bench.cpu_blocks --repeats 5
  NUMBA_CACHE_DIR=$HOME/.cache/attnkit-targets/haswell NUMBA_CPU_NAME=haswell NUMBA_CPU_FEATURES=$AVX2 \
  ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
  $PY -m attnkit.bench.cpu_dtypes --suite targets --rounds 5; } | tee "$OUT/avx2.txt"

{ header "NUMBA_CPU_NAME=skylake-avx512 NUMBA_CPU_FEATURES=$AVX512 ONEDNN_MAX_CPU_ISA=AVX512_CORE MKL_ENABLE_INSTRUCTIONS=AVX512 python -m attnkit.bench.cpu_dtypes --suite targets --rounds 5"
  NUMBA_CACHE_DIR=$HOME/.cache/attnkit-targets/skylake-avx512 NUMBA_CPU_NAME=skylake-avx512 NUMBA_CPU_FEATURES=$AVX512 \
  ONEDNN_MAX_CPU_ISA=AVX512_CORE MKL_ENABLE_INSTRUCTIONS=AVX512 \
  $PY -m attnkit.bench.cpu_blocks --repeats 5
  NUMBA_CACHE_DIR=$HOME/.cache/attnkit-targets/skylake-avx512 NUMBA_CPU_NAME=skylake-avx512 NUMBA_CPU_FEATURES=$AVX512 \
  ONEDNN_MAX_CPU_ISA=AVX512_CORE MKL_ENABLE_INSTRUCTIONS=AVX512 \
  $PY -m attnkit.bench.cpu_dtypes --suite targets --rounds 5; } | tee "$OUT/avx512f.txt"

{ header "python -m attnkit.bench.cpu_dtypes --suite targets --rounds 5"
  $PY -m attnkit.bench.cpu_blocks --repeats 5
  $PY -m attnkit.bench.cpu_dtypes --suite targets --rounds 5; } | tee "$OUT/native.txt"
