#!/usr/bin/env bash
# The CPU record of bench/results/cpu.md: the Numba kernel against torch's CPU
# attention (and, forward, the NumPy reference), fp32, B=1, H=8.
#
#   bash scripts/cpu-record.sh [OUT]     (default OUT: bench/results)
#
# Writes OUT/cpu-numba-vs-torch (run 1: --rounds 3, with the reference),
# OUT/cpu-numba-vs-torch-repeat (run 2: --rounds 5, numba and torch only) and
# OUT/cpu-numba-vs-torch-gqa (grouped-query points), then prints their tables.
# About 40 minutes on the project's 2-core machine; keep the machine otherwise
# idle while it runs. Uses the environment that `make bench` sets up.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
out=${1:-bench/results}
bench=(.venv/bin/attnkit bench --repeats 3 --min-time 0.1 --time-limit 60)
ns=1024,4096,8192
compare=(.venv/bin/python -m attnkit.bench.compare)

run1=$out/cpu-numba-vs-torch run2=$out/cpu-numba-vs-torch-repeat gqa=$out/cpu-numba-vs-torch-gqa
for d in 64 128; do
    for causal in "" "--causal"; do
        tag=d$d${causal:+-causal}
        "${bench[@]}" --n $ns --backends numba,torch-sdpa-flash,reference --head-dim $d $causal \
            --mode forward --rounds 3 --out "$run1/$tag-forward"
        "${bench[@]}" --n $ns --backends numba,torch-sdpa-flash --head-dim $d $causal \
            --mode backward --rounds 3 --out "$run1/$tag-backward"
    done
done
.venv/bin/attnkit bench --backends numba,torch-sdpa-flash --n 16384 --mode forward --repeats 1 \
    --min-time 0.01 --time-limit 120 --out "$run1/d64-forward-16k"
for d in 64 128; do
    for causal in "" "--causal"; do
        tag=d$d${causal:+-causal}
        for mode in forward backward; do
            "${bench[@]}" --n $ns --backends numba,torch-sdpa-flash --head-dim $d $causal \
                --mode $mode --rounds 5 --out "$run2/$tag-$mode"
        done
    done
done
for mode in forward backward; do
    "${bench[@]}" --n 1024,4096 --backends numba,torch-sdpa-flash --kv-heads 2 \
        --mode $mode --rounds 3 --out "$gqa/d64-kv2-$mode"
done

tables() {  # folder, peers: forward runs, then backward runs
    "${compare[@]}" --peers "$2" "$1"/*-forward*/results.json
    "${compare[@]}" --peers torch-sdpa-flash "$1"/*-backward/results.json
}
echo "## $run1"; tables "$run1" torch-sdpa-flash,reference
echo "## $run2"; tables "$run2" torch-sdpa-flash
echo "## $gqa"; tables "$gqa" torch-sdpa-flash
