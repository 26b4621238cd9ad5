#!/usr/bin/env bash
# The record of bench/results/distributed.md: ring attention over 2 and 4 gloo ranks (one
# thread each) against one process on all cores; ~10 minutes on the 2-core machine.
set -eux
cd "$(dirname "$0")/.."
PY=${ATTNKIT_PYTHON_BIN:-.venv/bin/python}
out=bench/results/distributed.md
{ echo "# Context parallelism on $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores ($(date -u +%F))"
  echo
  echo "Commands: \`python -m attnkit.bench.distributed --world 2 --rounds 2\` and \`--world 4\`"
  echo "(scripts/distributed-record.sh). Times: forward + backward, slowest rank, median."
  echo "Peak memory: resident set growth during the step (inputs, outputs, gradients, temporaries)."
  echo; } > $out
# (the "Reading" section at the end of the file is written by hand after a run)
$PY -m attnkit.bench.distributed --world 2 --rounds 2 --out $out
$PY -m attnkit.bench.distributed --world 4 --rounds 2 --n 4096 16384 --out $out
