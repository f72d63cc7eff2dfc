"""vLLM's loader filter while offload is on: exactly the offloaded experts' tensors are skipped, stacked ones too."""

from __future__ import annotations


def test_the_filter_skips_exactly_the_named_tensors_and_leaves_vllms_rule_alone():
    from vllm.model_executor.model_loader import weight_utils

    from vllm_moe_offload.patches import weight_utils as patch

    patch.apply()
    patch.apply()  # plugins load more than once: wrapped once
    assert not hasattr(weight_utils.should_skip_weight.__wrapped__, "__wrapped__")
    skipped = patch.SkippedExpertTensors({"model.layers.0.experts.gate_up_proj", "model.layers.0.experts.3.w1.weight"})
    assert weight_utils.should_skip_weight("model.layers.0.experts.gate_up_proj", skipped)  # stacked: no expert id
    assert weight_utils.should_skip_weight("model.layers.0.experts.3.w1.weight", skipped)
    assert not weight_utils.should_skip_weight("model.layers.0.experts.4.w1.weight", skipped)  # not offloaded
    assert not weight_utils.should_skip_weight("model.layers.0.shared_experts.gate_proj.weight", skipped)
    # vLLM's expert-parallel rule, unchanged: other ranks' per-expert weights only
    assert weight_utils.should_skip_weight("model.layers.0.experts.3.w1.weight", {0, 1})
    assert not weight_utils.should_skip_weight("model.layers.0.experts.1.w1.weight", {0, 1})
    assert not weight_utils.should_skip_weight("model.layers.0.experts.gate_up_proj", {0, 1})
