#!/usr/bin/env bash
# The record of bench/results/flash-attn.txt: attnkit.flash_attn against torch SDPA on the
# flash-attn issue's two targets (packed prefill, a bf16 decode step in one cache);
# ~2 minutes on the 2-core machine. Run it on an otherwise idle machine.
set -eux
cd "$(dirname "$0")/.."
PY=${ATTNKIT_PYTHON_BIN:-.venv/bin/python}
header="($(date -u +%F), $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores)"
{ echo "# python -m attnkit.bench.flash_attn --rounds 7   $header"
  $PY -m attnkit.bench.flash_attn --rounds 7; } | tee bench/results/flash-attn.txt
