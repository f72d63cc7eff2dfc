"""Patch of ``vllm.model_executor.model_loader.default_loader.DefaultModelLoader``.

What: wraps ``_init_ep_weight_filter`` so that, when offload is on, the loader's
expert filter (``local_expert_ids``) is the empty set.
Why: vLLM's safetensors iterator then skips every ``.experts.<id>.`` tensor
*before* reading it, so offloaded experts are never materialized at load; the
plugin reads them from the checkpoint itself when a slot needs them.
Upstream: a per-layer "skip these experts" hook in the loader, or a load
format that defers expert tensors.
Remove when: such a hook exists. Contract: the method still exists with
``(self, model_config)`` and the iterator still honours ``local_expert_ids``.
"""

from __future__ import annotations

from vllm_moe_offload.patches import expect_params, is_patched, mark


def apply() -> None:
    from vllm.model_executor.model_loader import ep_weight_filter
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    if is_patched(DefaultModelLoader, "_init_ep_weight_filter"):
        return
    orig = expect_params(DefaultModelLoader, "_init_ep_weight_filter", ["self", "model_config"])
    expect_params(ep_weight_filter, "should_skip_weight", ["weight_name", "local_expert_ids"])

    def _init_ep_weight_filter(self, model_config):
        from vllm_moe_offload.integration.engine_config import current_offload_config

        orig(self, model_config)
        offload = current_offload_config()
        if offload is not None and offload.enabled:
            self.local_expert_ids = set()

    DefaultModelLoader._init_ep_weight_filter = mark(_init_ep_weight_filter, orig)
