#!/usr/bin/env bash
# GPU checks of vllm-moe-offload, for a machine with a CUDA GPU (runs, with CUDA parts SKIPPED, on a CPU too).
#
#   bash scripts/gpu_check.sh [MODEL]      # MODEL: a Mixtral-format checkpoint for the benchmark (optional)
#
# 1. Always: scripts/gpu_check.py, the torch-only runtime layer (needs torch, no vLLM): transfer engine with
#    pinned staging and a copy stream, slot pools vs all-resident MoE, quantize/dequantize, copy/compute
#    overlap (CUDA events), host-to-device bandwidth against the PCIe link.
# 2. When vLLM is importable: end-to-end token equality with stock vLLM, eager (no CUDA graphs) and compiled
#    (piecewise CUDA graphs split at the MoE op), and the config rewrite tests.
# 3. When vLLM is importable and MODEL is given: the benchmark against stock vLLM, and vLLM's own
#    --cpu-offload-gb with cpu_offload_params set to the experts.
# Prints PASS / FAIL / SKIPPED lines and ends with a JSON summary; exit status 1 when anything failed.
set -uo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] && PY=.venv/bin/python || PY=${PYTHON:-python3}
OUT=${GPU_CHECK_OUT:-$(mktemp -d)}
mkdir -p "$OUT"
export VLLM_RPC_BASE_PATH="$OUT/rpc" VLLM_CACHE_ROOT="$OUT/vllm-cache"
mkdir -p "$VLLM_RPC_BASE_PATH"
status=0
declare -A result

"$PY" scripts/gpu_check.py --json "$OUT/runtime.json"
if [ $? -eq 0 ]; then result[runtime]=PASS; else result[runtime]=FAIL; status=1; fi

if "$PY" -c "import vllm" 2>/dev/null; then
  if "$PY" -m pytest -q -p no:cacheprovider --basetemp="$OUT/pytest" \
      tests/integration/test_equality.py tests/integration/test_modes.py tests/integration/test_cuda_graph_config.py \
      > "$OUT/e2e.log" 2>&1; then
    result[e2e_graphs_off_and_on]=PASS; echo "PASS e2e_graphs_off_and_on: $(tail -1 "$OUT/e2e.log")"
  else
    result[e2e_graphs_off_and_on]=FAIL; status=1; echo "FAIL e2e_graphs_off_and_on: see $OUT/e2e.log"; tail -20 "$OUT/e2e.log"
  fi
  if [ -n "${1:-}" ]; then
    if "$PY" -m vllm_moe_offload.cli.main bench "$1" --policies lru,fate --budgets 25%,50% --out "$OUT/bench" \
        > "$OUT/bench.log" 2>&1 && "$PY" scripts/gpu_check.py --uva-anchor "$1" --json "$OUT/uva.json" >> "$OUT/bench.log" 2>&1; then
      result[bench]=PASS; echo "PASS bench: tables in $OUT/bench, vLLM --cpu-offload-gb anchor in $OUT/uva.json"
    else
      result[bench]=FAIL; status=1; echo "FAIL bench: see $OUT/bench.log"; tail -20 "$OUT/bench.log"
    fi
  else
    result[bench]=SKIPPED; echo "SKIPPED bench: give a MODEL folder to benchmark against stock vLLM and --cpu-offload-gb"
  fi
else
  result[e2e_graphs_off_and_on]=SKIPPED; result[bench]=SKIPPED
  echo "SKIPPED e2e_graphs_off_and_on: vLLM is not installed here (the torch-only checks above still ran)"
  echo "SKIPPED bench: vLLM is not installed here"
fi

echo "JSON SUMMARY"
"$PY" - "$OUT" "${result[runtime]}" "${result[e2e_graphs_off_and_on]}" "${result[bench]}" <<'PYEOF'
import json, sys
from pathlib import Path
out, runtime, e2e, bench = sys.argv[1:]
summary = {"out": out, "runtime": runtime, "e2e_graphs_off_and_on": e2e, "bench": bench}
for name in ("runtime", "uva"):
    path = Path(out) / f"{name}.json"
    if path.exists():
        summary[f"{name}_detail"] = json.loads(path.read_text())
summary["result"] = "FAIL" if "FAIL" in (runtime, e2e, bench) else "PASS"
print(json.dumps(summary))
PYEOF
exit $status
