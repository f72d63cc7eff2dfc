#!/usr/bin/env bash
# vLLM's own load client (`vllm bench serve`, random dataset) against `vllm serve`, stock and with offload.
#
#   bash scripts/bench_serve.sh [MODEL] [OUT]
#
# MODEL: default .scratch/tm-x16, the trained tiny Mixtral padded to ~3 MiB experts (made here
# when missing), so that expert loads cost something. OUT: default docs/bench/serve.
# For each configuration it starts a server on 127.0.0.1, waits for /health, runs
# NUM_PROMPTS random prompts (INPUT_LEN in, OUTPUT_LEN out, all sent at once, ignore_eos)
# and stops it; OUT/<name>.txt is the client's report, OUT/<name>.json its saved result,
# OUT/<name>.serve.log the server's log. Override the workload with the variables below.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
model=${1:-.scratch/tm-x16}
out=${2:-docs/bench/serve}
NUM_PROMPTS=${NUM_PROMPTS:-32}
INPUT_LEN=${INPUT_LEN:-128}
OUTPUT_LEN=${OUTPUT_LEN:-32}
mkdir -p "$out"
if [ ! -f "$model/config.json" ]; then
  vllm-moe-offload pad-model ../shared/models/tiny-mixtral "$model" --factor 16
fi
scratch=$(mktemp -d)
server=""
cleanup() {
  if [ -n "$server" ]; then kill -TERM -- "-$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; fi
  rm -rf "$scratch"
}
trap cleanup EXIT
# vLLM leaves sockets and compile caches behind unless pointed at a scratch folder
export VLLM_RPC_BASE_PATH="$scratch/rpc" VLLM_CACHE_ROOT="$scratch/cache"
mkdir -p "$VLLM_RPC_BASE_PATH"
port=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

run() {  # NAME stock|offload [offload flags...]
  local name=$1 kind=$2 plugins=()
  shift 2
  # VLLM_PLUGINS=moe_offload_amx: stock vLLM although the plugin is installed, with only the plugin's AMX
  # permission (with none, vLLM's workers die with SIGILL on AMX CPUs: vllm_moe_offload/runtime/amx.py)
  if [ "$kind" = stock ]; then plugins=(env VLLM_PLUGINS=moe_offload_amx); else plugins=(env -u VLLM_PLUGINS); fi
  echo "== $name: vllm serve $model $*"
  # the whole server (API server + engine core) in its own process group, stopped as one
  "${plugins[@]}" setsid vllm serve "$model" "$@" --host 127.0.0.1 --port "$port" \
    --dtype bfloat16 --max-model-len 512 --kv-cache-memory-bytes $((256 * 1024 * 1024)) \
    > "$out/$name.serve.log" 2>&1 &
  server=$!
  for _ in $(seq 300); do
    curl -sf "http://127.0.0.1:$port/health" > /dev/null && break
    kill -0 "$server" 2>/dev/null || { tail -40 "$out/$name.serve.log"; exit 1; }
    sleep 1
  done
  vllm bench serve --backend vllm --base-url "http://127.0.0.1:$port" --model "$model" \
    --dataset-name random --random-input-len "$INPUT_LEN" --random-output-len "$OUTPUT_LEN" \
    --num-prompts "$NUM_PROMPTS" --ignore-eos --seed 0 --disable-tqdm \
    --save-result --result-dir "$out" --result-filename "$name.json" 2>&1 \
    | grep -v -e "^Triton is installed" -e "^nanobind: " -e "^ - " -e "^See https://nanobind" | tee "$out/$name.txt"
  if [ "$kind" = offload ]; then
    curl -sf "http://127.0.0.1:$port/metrics" | grep '^vllm:moe_offload_' > "$out/$name.metrics.txt" || true
  fi
  kill -TERM -- "-$server"
  wait "$server" || true
  server=""
}

run stock stock
run fate-50 offload --moe-offload fate --moe-offload-budget 50%
echo "results in $out"
