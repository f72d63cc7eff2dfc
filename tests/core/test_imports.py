"""The policy core and the simulate command load neither torch, nor vLLM, nor matplotlib."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import vllm_moe_offload.core

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "vllm", "matplotlib")


def _loaded_after(modules: list[str]) -> list[str]:
    code = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_core_imports_no_torch_vllm_or_matplotlib():
    modules = [m.name for m in pkgutil.iter_modules(vllm_moe_offload.core.__path__, "vllm_moe_offload.core.")]
    assert "vllm_moe_offload.core.simulate" in modules
    assert _loaded_after(modules) == []


def test_cli_parser_imports_no_torch_vllm_or_matplotlib():
    assert _loaded_after(["vllm_moe_offload.cli.main", "vllm_moe_offload.cli.simulate"]) == []
