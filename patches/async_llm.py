"""Patch of ``vllm.v1.engine.async_llm.AsyncLLM``: offload metrics on the server's ``/metrics``.

What: wraps ``AsyncLLM.__init__`` so that, when offload is on, the new engine is
handed to ``vllm_moe_offload.integration.metrics.watch``, which polls the
workers' ``moe_offload_stats`` through ``AsyncLLM.collective_rpc`` and exports
them as ``vllm:moe_offload_*`` from prometheus_client's default registry.
Why: the offload counters live in the workers (engine-core process); ``/metrics``
is served by the API-server process, and vLLM has no channel for a plugin's
worker statistics (``SchedulerStats`` is fixed; a stat-logger plugin sees only
``SchedulerStats`` and, once installed, switches stats on for every server,
offload or not). The module docstring of ``integration/metrics.py`` has the details.
Upstream: a worker-stats field in ``SchedulerStats``/``EngineCoreOutputs`` (or a
stat-logger hook that can reach ``collective_rpc``).
Remove when: such a channel exists. Contract: ``__init__(self, vllm_config, ...)``
keeps ``self.vllm_config``, ``collective_rpc`` and ``errored``.
Cost when offload is off: importing ``async_llm`` in every vLLM process (10-20 ms
measured in an engine-core or ``LLM`` process, which already hold most of its
imports) and one dictionary lookup per ``AsyncLLM``.
"""

from __future__ import annotations

from vllm_moe_offload.patches import PatchContractError, expect_params, is_patched, mark


def apply() -> None:
    from vllm.v1.engine.async_llm import AsyncLLM

    if is_patched(AsyncLLM, "__init__"):
        return
    orig = expect_params(AsyncLLM, "__init__", ["self", "vllm_config"])
    expect_params(AsyncLLM, "collective_rpc", ["self", "method"])
    if not isinstance(getattr(AsyncLLM, "errored", None), property):
        raise PatchContractError(
            "vllm-moe-offload: vllm.v1.engine.async_llm.AsyncLLM.errored is no longer a property; "
            "this vLLM is not supported"
        )

    def __init__(self, vllm_config, *args, **kwargs):
        from vllm_moe_offload.integration.engine_config import offload_config_of

        orig(self, vllm_config, *args, **kwargs)
        offload = offload_config_of(vllm_config)
        if offload is not None and offload.enabled:
            from vllm_moe_offload.integration.metrics import watch

            watch(self)

    AsyncLLM.__init__ = mark(__init__, orig)
