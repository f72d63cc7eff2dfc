"""Patch of ``vllm.model_executor.model_loader.weight_utils.should_skip_weight``.

What: wraps the expert filter the safetensors iterators call before reading
each tensor. When the loader's ``local_expert_ids`` is a
:class:`SkippedExpertTensors` (set by ``patches/default_loader.py`` when offload
is on), a tensor is skipped exactly when its checkpoint name is one of the
offloaded experts' tensors; otherwise vLLM's own rule applies, unchanged.
Why: vLLM's rule skips only ``.experts.<id>.`` weights of other expert-parallel
ranks; tensors stacking every expert of a layer (``experts.gate_up_proj``,
Gemma-4, Qwen3.5-MoE, Llama-4) have no id and would be read whole, the very
memory offload exists to avoid.
Upstream: a loader filter by tensor name (e.g. a predicate next to
``local_expert_ids``).
Remove when: vLLM's loader takes such a predicate. Contract: the function
still takes ``(weight_name, local_expert_ids)`` and the iterators look it up
in ``weight_utils``' namespace at call time.
"""

from __future__ import annotations

from collections.abc import Iterable

from vllm_moe_offload.patches import expect_params, is_patched, mark


class SkippedExpertTensors(set):
    """The loader's ``local_expert_ids`` while offload is on: no expert is loaded by vLLM.

    An empty set, as vLLM reads that attribute (no local expert ids), carrying
    the checkpoint names of the tensors the plugin reads itself.
    """

    def __init__(self, names: Iterable[str]) -> None:
        super().__init__()
        self.names = frozenset(names)


def apply() -> None:
    from vllm.model_executor.model_loader import weight_utils

    if is_patched(weight_utils, "should_skip_weight"):
        return
    orig = expect_params(weight_utils, "should_skip_weight", ["weight_name", "local_expert_ids"])

    def should_skip_weight(weight_name, local_expert_ids):
        if isinstance(local_expert_ids, SkippedExpertTensors):
            return weight_name in local_expert_ids.names
        return orig(weight_name, local_expert_ids)

    weight_utils.should_skip_weight = mark(should_skip_weight, orig)
