"""Imports point one way: the runtime layer never loads vLLM, and importing the package loads neither."""

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import vllm_moe_offload.runtime

REPO = Path(__file__).resolve().parents[2]


def _loaded_after(modules):
    code = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'vllm'})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_runtime_imports_torch_but_not_vllm():
    modules = [m.name for m in pkgutil.iter_modules(vllm_moe_offload.runtime.__path__, "vllm_moe_offload.runtime.")]
    assert "vllm_moe_offload.runtime.slots" in modules
    assert _loaded_after(modules) == ["torch"]


def test_package_import_is_cheap_until_register():
    # vLLM imports the entry point in every process; registering is what pulls vLLM in
    assert _loaded_after(["vllm_moe_offload"]) == []
