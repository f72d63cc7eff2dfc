"""One quantized expert, from checkpoint tensors to the kernel's layout, by vLLM's own loader and conversion.

A load fills a one-expert holder made by the quant method's own ``create_weights``
(one expert) through vLLM's ``weight_loader`` (gpt-oss: its own class's), then runs
what the quant method's ``process_weights_after_loading`` does to the layer on the
CPU backend, for that one expert. The formats and what the slots hold:
``quantized_experts.py``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import torch
from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts

from vllm_moe_offload.integration.quantized_experts import (
    AWQ_INT4, CT_W4A16, FP8_BLOCK, GPTQ_INT4, INT8_W8A8, MXFP4, ExpertFormat, expert_param_names,
)
from vllm_moe_offload.runtime.tiers import Into, Scratch


class QuantizedExpertConverter:
    """(w1, w3, w2, into, extras) in checkpoint layout -> ``(w13, w2, *extra)`` in the kernel's, for one expert.

    vLLM's ``weight_loader`` fills a one-expert holder made by the quant method's
    ``create_weights``; vLLM's per-expert conversion packs it. One holder per I/O
    thread, its parameters' memory the running fetch's conversion scratch when
    ``scratch`` is given (reused, and counted in the budget's conversion hold).
    """

    prepack_isa = None  # how ``kernel_format.describe_conversion`` tells: vLLM converts, the result is copied

    def __init__(
        self, layer: torch.nn.Module, create_weights: Callable[[torch.nn.Module], None], scratch: Scratch | None = None,
    ) -> None:
        self.layer = layer
        self.create_weights = create_weights
        self.scratch = scratch
        self.params = expert_param_names(layer)
        self.format: ExpertFormat = layer.expert_format
        self.quant_method = layer.quant_method
        #: vLLM's MoE backend the conversion is for (a kernel store's stamp)
        self.backend = getattr(self.quant_method, self.format.backend_attr)
        self.fused_experts = self.quant_method.moe_kernel.fused_experts
        # the slots' shapes: what vLLM's conversion made of the layer's one-expert placeholder
        self.shapes = [(tuple(getattr(layer, n).shape[1:]), getattr(layer, n).dtype) for n in self.params]
        self._loader, self._shard = RoutedExperts.weight_loader, lambda shard_id, param: shard_id
        if self.format.own_loader:
            from vllm_moe_offload.integration import gpt_oss

            self._loader, self._shard = gpt_oss.own_weight_loader(), gpt_oss.holder_shard
        self._local = threading.local()

    def _holder(self) -> torch.nn.Module:
        holder = getattr(self._local, "holder", None)
        if holder is None:
            holder = torch.nn.Module()
            self.create_weights(holder)  # the quant method's own parameters, one expert
            self._local.holder = holder
        return holder

    def __call__(
        self, w1: torch.Tensor, w3: torch.Tensor | None, w2: torch.Tensor, into: Into = None,
        extras: Sequence[tuple[str, str, torch.Tensor]] = (),
    ) -> tuple[torch.Tensor, ...]:
        holder = self._holder()
        for name, param in holder.named_parameters():
            if self.scratch is not None:  # the Parameter and its loader attributes stay; its memory is reused
                param.data = self.scratch(f"one-expert {name}", tuple(param.shape), param.dtype)
            param.data.zero_()  # what a shard leaves out (padding) is zero, as in a fresh layer
        w13_name, w2_name = self.format.weight_params
        for param, shard_id, tensor in ((w13_name, "w1", w1), (w13_name, "w3", w3), (w2_name, "w2", w2), *extras):
            if tensor is None:
                continue
            # vLLM's own loader (not the offloaded layer's, which drops expert tensors): this rank's shard
            # of one expert, scales included, into expert 0 of the holder
            loaded = self._loader(self.layer, getattr(holder, param), tensor, param, self._shard(shard_id, param), 0,
                                  return_success=True)
            if not loaded:
                raise RuntimeError(f"{self.layer.layer_name}: vLLM's weight_loader did not load {param} ({shard_id})")
        out = tuple(t[0] for t in self._convert(holder))  # no expert dim
        for got, name, (shape, dtype) in zip(out, self.params, self.shapes):
            if tuple(got.shape) != shape or got.dtype != dtype:
                raise RuntimeError(
                    f"{self.layer.layer_name}: vLLM's conversion gave {name} {got.dtype} {list(got.shape)} for one "
                    f"expert; the layer's slots hold {dtype} {list(shape)}"
                )
        if into is not None:
            for dst, src in zip(into, out, strict=True):
                dst.copy_(src)
            return into
        held = {p.untyped_storage().data_ptr() for p in holder.parameters()}
        return tuple(t.clone() if t.untyped_storage().data_ptr() in held else t for t in out)  # the holder is reused

    def _convert(self, holder: torch.nn.Module) -> tuple[torch.Tensor, ...]:
        """vLLM's per-expert conversion of the holder, in :func:`expert_param_names` order."""
        return _CONVERSIONS[self.format.name](self, holder)

    def _convert_fp8(self, holder: torch.nn.Module) -> tuple[torch.Tensor, ...]:
        """What ``process_weights_after_loading`` does to the weights of an FP8 block layer (its other
        steps: ROCm's fnuz, static or per-tensor scales, none here)."""
        from vllm.model_executor.layers.fused_moe.oracle.fp8 import convert_to_fp8_moe_kernel_format

        w13, w2, w13_scale, w2_scale = convert_to_fp8_moe_kernel_format(
            fp8_backend=self.backend, layer=holder, w13=holder.w13_weight, w2=holder.w2_weight,
            w13_scale=holder.w13_weight_scale_inv, w2_scale=holder.w2_weight_scale_inv,
            w13_input_scale=None, w2_input_scale=None,
        )
        return w13, w2, w13_scale, w2_scale

    def _convert_int4(self, holder: torch.nn.Module) -> tuple[torch.Tensor, ...]:
        """What ``AutoAWQMoEMethod`` / ``AutoGPTQMoEMethod.process_weights_after_loading`` do to an int4 layer's
        tensors on the CPU backend (no biases, no input global scales: none on this path). GPTQ's are first
        turned from ``[E, in/8, out]`` to vLLM's canonical ``[E, out, ...]``, as its method does."""
        from vllm.model_executor.layers.fused_moe.oracle.int_wna16 import convert_to_wna16_moe_kernel_format

        tensors = [holder.w13_qweight, holder.w2_qweight, holder.w13_scales, holder.w2_scales,
                   holder.w13_qzeros, holder.w2_qzeros]
        if self.format is GPTQ_INT4:
            tensors = [t.data.transpose(1, 2).contiguous() for t in tensors]
        w13, w2, w13_scale, w2_scale, w13_qzeros, w2_qzeros = tensors
        w13, w2, w13_scale, w2_scale, w13_zp, w2_zp, *_ = convert_to_wna16_moe_kernel_format(
            backend=self.backend, layer=holder, quant_config=self.quant_method.quant_config,
            input_dtype=self.quant_method.input_dtype, w13=w13, w2=w2, w13_scale=w13_scale, w2_scale=w2_scale,
            w13_qzeros=w13_qzeros, w2_qzeros=w2_qzeros,
        )
        return w13, w2, w13_scale, w2_scale, w13_zp, w2_zp

    def _convert_ct_wna16(self, holder: torch.nn.Module) -> tuple[torch.Tensor, ...]:
        """What ``CompressedTensorsWNA16MoEMethod.process_weights_after_loading`` does on the CPU backend: the
        swigluoai interleave where the activation needs it (none for silu), then the conversion, which turns
        the N-first tensors to GPTQ's layout and makes the symmetric zero points."""
        from vllm.model_executor.layers.fused_moe.experts.cpu_moe import swigluoai_w13_interleave_perm
        from vllm.model_executor.layers.fused_moe.oracle.int_wna16 import convert_to_wna16_moe_kernel_format

        method = self.quant_method
        w13, w13_scale = holder.w13_weight_packed.data, holder.w13_weight_scale.data
        perm = swigluoai_w13_interleave_perm(method.experts_cls, method.moe.activation, w13.size(1), w13.device)
        if perm is not None:
            w13, w13_scale = w13[:, perm].contiguous(), w13_scale[:, perm].contiguous()
        w13, w2, w13_scale, w2_scale, w13_zp, w2_zp, *_ = convert_to_wna16_moe_kernel_format(
            backend=self.backend, layer=holder, quant_config=method.weight_quant, input_dtype=method.input_dtype,
            w13=w13, w2=holder.w2_weight_packed.data, w13_scale=w13_scale, w2_scale=holder.w2_weight_scale.data,
        )
        return w13, w2, w13_scale, w2_scale, w13_zp, w2_zp

    def _convert_mxfp4(self, holder: torch.nn.Module) -> tuple[torch.Tensor, ...]:
        """What ``GptOssMxfp4MoEMethod.process_weights_after_loading`` does on the CPU backend: vLLM's
        conversion of the weights, scales and biases (its kernel's own ``process_weights_after_loading`` does
        nothing on the CPU)."""
        from vllm.model_executor.layers.fused_moe.oracle.mxfp4 import (
            convert_gpt_oss_weight_to_mxfp4_moe_kernel_format,
        )

        w13, w2, w13_scale, w2_scale, w13_bias, w2_bias = convert_gpt_oss_weight_to_mxfp4_moe_kernel_format(
            mxfp4_backend=self.backend, layer=holder, w13_weight=holder.w13_weight, w2_weight=holder.w2_weight,
            w13_weight_scale=holder.w13_weight_scale, w2_weight_scale=holder.w2_weight_scale,
            w13_bias=holder.w13_bias, w2_bias=holder.w2_bias, _cache_permute_indices={},
        )
        return w13, w2, w13_scale, w2_scale, w13_bias, w2_bias

    def _convert_int8(self, holder: torch.nn.Module) -> tuple[torch.Tensor, ...]:
        """What ``CompressedTensorsW8A8Int8MoEMethod.process_weights_after_loading`` does on the CPU backend:
        vLLM's conversion (none on the CPU), then the kernel's own ``process_weights_after_loading`` (the VNNI
        prepack of both weights), run on a module of their own so that the holder keeps its parameters."""
        from vllm.model_executor.layers.fused_moe.oracle.int8 import convert_to_int8_moe_kernel_format

        w13, w2 = convert_to_int8_moe_kernel_format(
            int8_backend=self.backend, w13=holder.w13_weight, w2=holder.w2_weight, layer=holder,
            w13_scale=holder.w13_weight_scale,
        )
        weights = torch.nn.Module()
        weights.w13_weight = torch.nn.Parameter(w13.data, requires_grad=False)
        weights.w2_weight = torch.nn.Parameter(w2.data, requires_grad=False)
        self.fused_experts.process_weights_after_loading(weights)
        return (weights.w13_weight.data, weights.w2_weight.data, holder.w13_weight_scale.data,
                holder.w2_weight_scale.data)


#: each format's conversion (what its quant method's ``process_weights_after_loading`` does on the CPU backend)
_CONVERSIONS = {
    FP8_BLOCK.name: QuantizedExpertConverter._convert_fp8,
    AWQ_INT4.name: QuantizedExpertConverter._convert_int4,
    GPTQ_INT4.name: QuantizedExpertConverter._convert_int4,
    CT_W4A16.name: QuantizedExpertConverter._convert_ct_wna16,
    MXFP4.name: QuantizedExpertConverter._convert_mxfp4,
    INT8_W8A8.name: QuantizedExpertConverter._convert_int8,
}
