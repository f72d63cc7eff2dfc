"""Turning one expert's checkpoint tensors into the layer's kernel layout.

vLLM converts a whole ``[E, ...]`` layer at load (``process_weights_after_loading``:
padding, CPU prepacking). The slot pool needs the same conversion one expert at
a time, so we run vLLM's own conversion on a one-expert holder module. This is
exact because the conversions are per-expert separable (checked by the
end-to-end token-equality tests).
"""

from __future__ import annotations

import torch
from vllm.model_executor.layers.fused_moe.oracle.unquantized import (
    UnquantizedMoeBackend,
    convert_to_unquantized_kernel_format,
)

from vllm_moe_offload.runtime.tiers import Converter

#: backends whose per-expert conversion is vLLM's own and needs no global state
SUPPORTED_BACKENDS = (UnquantizedMoeBackend.CPU, UnquantizedMoeBackend.TRITON)


class _OneExpert(torch.nn.Module):
    """What ``process_weights_after_loading`` of the experts kernel reads from a layer."""

    def __init__(self, layer: torch.nn.Module, w13: torch.Tensor, w2: torch.Tensor) -> None:
        super().__init__()
        self.moe_config = layer.moe_config
        self.activation = layer.activation
        self.w13_weight = torch.nn.Parameter(w13, requires_grad=False)
        self.w2_weight = torch.nn.Parameter(w2, requires_grad=False)


def make_converter(layer: torch.nn.Module) -> Converter:
    """A function (w1, w3, w2) -> (w13, w2) in ``layer``'s kernel layout, on the host."""
    quant_method = layer.quant_method
    backend = quant_method.unquantized_backend
    if backend not in SUPPORTED_BACKENDS:
        raise NotImplementedError(
            f"{layer.layer_name}: MoE offload supports the {[b.value for b in SUPPORTED_BACKENDS]} "
            f"MoE backends; this layer uses {backend.value} (try --moe-backend triton on CUDA)"
        )
    fused_experts = quant_method.moe_kernel.fused_experts
    dtype = layer.params_dtype

    def convert(w1: torch.Tensor, w3: torch.Tensor | None, w2: torch.Tensor):
        w13 = torch.cat([w1, w3]) if w3 is not None else w1  # [2I, H]: gate rows, then up rows
        w13, w2 = w13.to(dtype)[None], w2.to(dtype)[None]  # [1, 2I, H], [1, H, I]
        holder = _OneExpert(layer, *convert_to_unquantized_kernel_format(backend, layer.moe_config, w13, w2))
        fused_experts.process_weights_after_loading(holder)  # pads / prepacks in place
        return holder.w13_weight.data[0], holder.w2_weight.data[0]

    return convert
