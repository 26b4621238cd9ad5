#!/usr/bin/env bash
# bench/results/peers.md: attnkit against every attention a CPU user can pip install (attnkit[peers]),
# the contenders taking turns (--rounds 2). About 30 minutes on the 2-core machine.
#   ONLY="decode-gqa decode-gqa-bf16" bash scripts/peers-record.sh   re-runs some cases, then the tables
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-bench/results/peers}
PEERS=torch-sdpa-flash,torch-flex,jax-xla,onnxruntime-attention,onnxruntime-gqa,openvino-sdpa
NO_GQA_OP=torch-sdpa-flash,torch-flex,jax-xla,onnxruntime-attention,openvino-sdpa  # GroupQueryAttention: causal prefill only
BF16=torch-sdpa-flash,torch-flex,jax-xla,openvino-sdpa  # ONNX Runtime has no bf16 attention on the CPU
mkdir -p "$OUT"
run() {
    name=$1; backends=$2; shift 2
    case " ${ONLY:-$name} " in *" $name "*) ;; *) return 0 ;; esac
    $PY -m attnkit bench --backends "numba,$backends" --rounds 2 --out "$OUT/$name" "$@" > "$OUT/$name.txt"
}
run fp32 "$NO_GQA_OP" --n 256..4096
run fp32-causal "$PEERS" --n 256..4096 --causal
run bf16-causal "$BF16" --n 256..4096 --causal --dtype bfloat16
run fp32-gqa-causal "$PEERS" --n 256..2048 --causal --heads 32 --kv-heads 8 --head-dim 128
run decode-gqa "$NO_GQA_OP" --n 512..8192 --query-len 1 --batch 4 --heads 32 --kv-heads 8 --head-dim 128
run decode-gqa-bf16 "$BF16" --n 512..8192 --query-len 1 --batch 4 --heads 32 --kv-heads 8 --head-dim 128 --dtype bfloat16
{ echo "# attnkit against its CPU peers   ($(date -u +%F), $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores)"
  echo
  echo "Command: \`bash scripts/peers-record.sh\` (each run's table, roofline and JSON in bench/results/peers/)."
  echo "Forward passes; each run's settings are in its results.json (B=1, H=8, D=64 unless the run's name says"
  echo "GQA: H=32 / 8 kv heads, D=128; decode: B=4, one query against N cached keys)."
  echo
  echo "## attnkit against the fastest peer at each point"
  echo
  $PY -m attnkit.bench.compare "$OUT"/*/results.json --subject numba --peers "$PEERS" --best
  echo
  echo "## Every peer"
  echo
  $PY -m attnkit.bench.compare "$OUT"/*/results.json --subject numba --peers "$PEERS"; } > bench/results/peers.md
