"""vLLM's CPU MoE kernel called straight from an offloaded layer, where vLLM would call it plainly.

An offloaded layer computes through vLLM's fused-MoE machinery: the quant method, the modular kernel,
its prepare/finalize object, buffer allocation and a finalize step, which on the CPU backend all end in
one ``cpu_fused_moe`` call. That machinery is about 70-100 us of Python per call here (the 2-core Xeon
with AMX, one compute thread, padded tiny-mixtral: 317 us per decode call against 245 us in the kernel
itself; about 100 us of each call of a 512-token prefill), paid once per layer and token in decode and
once per wave in a prefill (5-8 calls per layer where stock makes one). Where the layer's experts run
that kernel plainly, :func:`direct_call` makes the same call without it: the same op, with the arguments
vLLM passes (the layer's weights, which are the slot pools, no biases, the activation and ISA, the
router's weights applied after the experts) into an output of the input's shape, which is where vLLM's
kernel writes too (its fused output aliases the step's output), so every result is bit for bit vLLM's.

Plainly means: ``CPUUnquantizedExperts`` (its ``apply`` not overridden, not routed to zentorch) behind
the no-DP/EP prepare/finalize whose finalize is a no-op, no expert map, no router weights on the input,
no LoRA, no expert biases. Anything else (CUDA, quantized CPU kernels, zentorch) goes through vLLM's
machinery as before.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

#: what ``offload_stats()["kernel"]`` says of each path
DIRECT = "cpu_fused_moe, called directly"
VIA_VLLM = "vLLM's fused-MoE kernel"

KernelCall = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def direct_call(layer) -> KernelCall | None:
    """``call(x, topk_weights, slot_ids) -> out`` running ``layer``'s experts as vLLM would, or None where
    vLLM's machinery does more than the one kernel call (see the module's docstring)."""
    if layer.w13_weight.device.type != "cpu":
        return None
    try:  # vLLM's CPU MoE module, imported only where the weights are on the CPU
        from vllm.model_executor.layers.fused_moe.experts import cpu_moe
        from vllm.model_executor.layers.fused_moe.modular_kernel import FusedMoEKernelModularImpl
        from vllm.model_executor.layers.fused_moe.prepare_finalize.no_dp_ep import MoEPrepareAndFinalizeNoDPEPModular
        from vllm.model_executor.layers.fused_moe.topk_weight_and_reduce import TopKWeightAndReduceNoOP
    except ImportError:  # another vLLM layout: its machinery it is
        return None

    impl = getattr(getattr(layer.quant_method, "moe_kernel", None), "impl", None)
    if type(impl) is not FusedMoEKernelModularImpl:
        return None
    experts = impl.fused_experts
    if (
        not isinstance(experts, cpu_moe.CPUUnquantizedExperts)
        or type(experts).apply is not cpu_moe.CPUUnquantizedExperts.apply
        or getattr(experts, "_use_zentorch", True)
        or getattr(experts, "_lora_context", None) is not None
        or type(impl.prepare_finalize) is not MoEPrepareAndFinalizeNoDPEPModular
        or not isinstance(experts.finalize_weight_and_reduce_impl(), TopKWeightAndReduceNoOP)
        or experts.w1_bias is not None
        or experts.w2_bias is not None
        or layer.expert_map is not None
        or layer.apply_router_weight_on_input
    ):
        return None
    kernel, activation, isa = cpu_moe.cpu_fused_moe, layer.activation.value, experts.isa

    def call(x: torch.Tensor, topk_weights: torch.Tensor, slot_ids: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x)
        kernel(out, x, layer.w13_weight, layer.w2_weight, None, None, topk_weights, slot_ids, activation, isa, False)
        return out

    return call
