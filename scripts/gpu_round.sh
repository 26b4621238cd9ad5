#!/usr/bin/env bash
# One call on a lent GPU machine: what the card and its packages are, the Triton test files on the
# card (one pytest process per file, side by side, while bench/gpu_check.py checks correctness),
# then gpu_check's timings. Everything lands in OUT (at most six files, for the device tool's limit):
#   versions.txt  tests.log  correctness.log  correctness/gpu_check.json  timing.log  timing/gpu_check.json
#
#   bash scripts/gpu_round.sh OUT [gpu_check timing options, e.g. --quick --budget-s 150]
#
# TEST_TIMEOUT (default 200 s) caps each test process; CHECK_TIMEOUT (default 200 s) the correctness
# check; TIMING_TIMEOUT (default 300 s) the timing run. TEST_FILES ("file:-k expression" words)
# chooses the test files; TEST_WORKERS (default 6) the pytest-xdist workers of test_triton_kernel.
set -u
out=${1:?usage: scripts/gpu_round.sh OUT [gpu_check timing options]}
shift
mkdir -p "$out" /tmp/gpu_round
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."

{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
    python3 -c "import sys, torch, triton, numpy, numba; print('python', sys.version.split()[0], 'torch', \
torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__, 'numba', numba.__version__)"
    nproc
} 2>&1 | tee "$out/versions.txt"

# Tests and the correctness check run each kernel at its first configuration (no autotuning: with it,
# every new shape class compiled and benchmarked all configurations, and four tests took 170 s);
# the timings below autotune as a user's calls do.
workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n ${TEST_WORKERS:-6}")
pids=()
for spec in ${TEST_FILES:-"test_triton_kernel:" "test_triton_varlen:" "test_triton_dropout:" "test_flex:triton" \
            "test_sinks:triton"}; do
    file=${spec%%:*}
    select=${spec#*:}
    parallel=""
    [ "$file" = test_triton_kernel ] && parallel=$workers
    ATTNKIT_TRITON_AUTOTUNE=0 timeout "${TEST_TIMEOUT:-200}" python3 -m pytest -q -p no:cacheprovider -rfE \
        $parallel "tests/$file.py" ${select:+-k "$select"} >"/tmp/gpu_round/$file.log" 2>&1 &
    pids+=($!)
done

ATTNKIT_TRITON_AUTOTUNE=0 timeout "${CHECK_TIMEOUT:-200}" python3 bench/gpu_check.py "$out/correctness" \
    --sections correctness >"$out/correctness.log" 2>&1
echo "gpu_check correctness: exit $?" >>"$out/correctness.log"

for pid in "${pids[@]}"; do wait "$pid"; done
for log in /tmp/gpu_round/*.log; do
    echo "=== $(basename "$log" .log)"
    tail -n 60 "$log"
done >"$out/tests.log"
grep -h -E "passed|failed|error" /tmp/gpu_round/*.log | tail -n 20

timeout "${TIMING_TIMEOUT:-300}" python3 bench/gpu_check.py "$out/timing" --sections "${SECTIONS:-timing,flex}" "$@" \
    >"$out/timing.log" 2>&1
echo "gpu_check timing: exit $?" >>"$out/timing.log"
tail -n 5 "$out/correctness.log"
grep -E "FAIL" "$out/correctness.log" | head -n 20
tail -n 45 "$out/timing.log"
