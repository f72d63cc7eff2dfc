#!/usr/bin/env bash
# Benchmark stock vLLM against the offload policies at several budgets on one model:
# batch-1 decode, a prefill and a batch of concurrent requests, each in a real vLLM
# engine, with a report (bench.md), the numbers (bench.json) and plots in OUT.
#
#   bash examples/benchmark.sh                      # padded models/tiny-pymoe (3 MiB experts), made once
#   bash examples/benchmark.sh MODEL OUT [--quick]  # any Mixtral-format MoE folder; extra args go to bench
#
# Expert loads then really cost something: pad-model blows each expert of the trained
# tiny-pymoe shipped in models/ up 64x (48 KiB -> 3 MiB), so the disk tier moves 3 MiB per miss. Add
# --link-gbps/--link-latency-ms to emulate a slower link (reports are labelled EMULATED).
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-.scratch/pymoe-x64}
out=${2:-.scratch/bench-example}
shift $(( $# > 2 ? 2 : $# ))
if [ ! -f "$model/config.json" ]; then
  vllm-moe-offload pad-model models/tiny-pymoe "$model" --factor 64
fi
vllm-moe-offload bench "$model" --tokens models/tiny-pymoe/heldout-tokens.npy --policies ondemand,lru,fate --budgets 25%,50% --out "$out" "$@"
echo "report: $out/bench.md"
