"""Patch of ``vllm.model_executor.model_loader.default_loader.DefaultModelLoader``.

What: wraps ``load_weights`` and ``_init_ep_weight_filter``. When offload is on,
``load_weights`` first refuses a model with MoE layers offload does not hold
(naming their class and the model), then works out which checkpoint tensors
hold the offloaded experts, by each layer's own vLLM expert mapping applied to
the checkpoint's header (``integration/checkpoint_layout.py``): per-expert
tensors and tensors stacking every expert alike. ``_init_ep_weight_filter``
then hands those names to the loader's expert filter (``local_expert_ids``),
which the safetensors iterator consults before reading each tensor
(``patches/weight_utils.py``).
Why: offloaded experts must never be read into memory at load; the plugin
reads them from the checkpoint itself when a slot needs them. A stacked
``experts.gate_up_proj`` holds every expert of a layer at once, and vLLM's own
filter only knows ``.experts.<id>.`` names.
Upstream: a per-layer "skip these experts" hook in the loader, or a load
format that defers expert tensors.
Remove when: such a hook exists. Contract: ``load_weights(self, model,
model_config)`` still calls ``_init_ep_weight_filter(self, model_config)``
before it iterates, and the iterator still passes ``local_expert_ids`` to
``should_skip_weight``.
"""

from __future__ import annotations

import os

from vllm_moe_offload.patches import expect_params, is_patched, mark


def apply() -> None:
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    from vllm_moe_offload.patches import weight_utils

    if is_patched(DefaultModelLoader, "_init_ep_weight_filter"):
        return
    orig_filter = expect_params(DefaultModelLoader, "_init_ep_weight_filter", ["self", "model_config"])
    orig_load = expect_params(DefaultModelLoader, "load_weights", ["self", "model", "model_config"])

    def load_weights(self, model, model_config):
        from vllm.config import get_current_vllm_config

        from vllm_moe_offload.integration.checkpoint_layout import offloaded_expert_tensors
        from vllm_moe_offload.integration.engine_config import current_offload_config

        offload = current_offload_config()
        self._moe_offload_skipped = None
        if offload is not None and offload.enabled:
            if not os.path.isdir(model_config.model):
                self.download_model(model_config)  # the header is read before vLLM's own download
            names = offloaded_expert_tensors(model, get_current_vllm_config())
            self._moe_offload_skipped = weight_utils.SkippedExpertTensors(names)
        return orig_load(self, model, model_config)

    def _init_ep_weight_filter(self, model_config):
        orig_filter(self, model_config)
        skipped = getattr(self, "_moe_offload_skipped", None)
        if skipped is not None:
            self.local_expert_ids = skipped

    DefaultModelLoader.load_weights = mark(load_weights, orig_load)
    DefaultModelLoader._init_ep_weight_filter = mark(_init_ep_weight_filter, orig_filter)
