#!/usr/bin/env bash
# Run the test suite (setting up .venv first when needed). Extra arguments go to
# pytest, e.g.  bash scripts/test.sh -m "not slow"   (skips the multi-minute tests)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/vllm ] || ! .venv/bin/python -c "import vllm_moe_offload, vllm, pytest, xdist" 2>/dev/null; then
  bash scripts/setup.sh
fi
. .venv/bin/activate
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
# vLLM leaves sockets and compile caches behind unless pointed at a scratch folder
export VLLM_RPC_BASE_PATH="$scratch/rpc" VLLM_CACHE_ROOT="$scratch/cache"
mkdir -p "$VLLM_RPC_BASE_PATH"
# Two workers where there are two cores: an engine's start-up (imports, model inspection) is
# mostly one core's work, so two files' engines share the machine well; each worker's engines
# compute on their own core (tests/conftest.py). PYTEST_WORKERS=1 runs everything in one process.
workers=${PYTEST_WORKERS:-$(( $(nproc) >= 2 ? 2 : 1 ))}
parallel=()
[ "$workers" -gt 1 ] && parallel=(-n "$workers" --dist loadfile)
# the slowest tests in the log: where to look when the suite grows past its time
exec python -m pytest -q -p no:cacheprovider --durations=25 --basetemp="$scratch/pytest" "${parallel[@]}" "$@"
