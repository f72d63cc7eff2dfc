"""Quantized experts, offloaded through vLLM's own code: FP8 block-quantized experts on vLLM's CPU FP8 backend,
AWQ / GPTQ / compressed-tensors W4A16 int4 experts on its CPU int4 backend, compressed-tensors W8A8 int8
experts on its CPU int8 backend, gpt-oss's MXFP4 experts (with biases) on its CPU MXFP4 backend.

vLLM builds a quantized MoE layer with its quant method: ``create_weights`` makes
the parameters (FP8 block: ``w13_weight`` / ``w2_weight`` in float8_e4m3fn and the
per-128x128-block scales ``w13_weight_scale_inv`` / ``w2_weight_scale_inv``), the
loader fills them one checkpoint tensor at a time with
``RoutedExperts.weight_loader``, and ``process_weights_after_loading`` converts
them (CPU: ``convert_weight_packed`` of each weight, the scales as they are,
``convert_to_fp8_moe_kernel_format``) and builds the kernel, whose quant config
keeps the scale parameters themselves. AWQ int4 (``AutoAWQMoEMethod``): the
checkpoint's ``w13_qweight`` / ``w2_qweight`` (int32, eight 4-bit values each,
``[in, out/8]``), ``w13_scales`` / ``w2_scales`` and ``w13_qzeros`` /
``w2_qzeros`` per group of inputs; ``convert_to_wna16_moe_kernel_format``
blocks all six for ``CPUExpertsInt4`` (``prepare_int4_moe_layer_for_cpu``) and
the layer's ``w13_weight`` / ``w2_weight`` become aliases of the packed
``*_qweight``. GPTQ int4 (``AutoGPTQMoEMethod``) has the same parameters packed
along the input (``[in/8, out]``), turned to ``[out, ...]`` before the same
conversion. Compressed-tensors W4A16 (``CompressedTensorsWNA16MoEMethod``) stores
``w13_weight_packed`` ``[out, in/8]`` and ``w13_weight_scale``; its CPU conversion
makes the (symmetric) zero points, which the slots hold as well. W8A8 int8
(``CompressedTensorsW8A8Int8MoEMethod``): int8 weights the kernel prepacks, float32
per-channel scales. gpt-oss MXFP4 (``GptOssMxfp4MoEMethod``): uint8 weights and e8m0
scales, bf16 biases the conversion turns to float32; its holder is filled by
``GptOssRoutedExperts.weight_loader`` (integration/gpt_oss.py). Offload runs the same
steps one expert at a time:

* the layer is built with one expert (``OffloadRoutedExperts`` asks
  ``create_weights`` for one) and vLLM post-processes that placeholder, so the
  kernel and its quant config exist;
* a load fills a one-expert holder, whose parameters come from the quant
  method's own ``create_weights`` with one expert (so they carry what the loader
  reads, such as the scales' ``quant_method``), through vLLM's
  ``weight_loader``, then converts it with vLLM's per-expert conversion into the
  slot (``quantized_conversion.QuantizedExpertConverter``);
* the slot pools take the placeholders' place, the scales' in place
  (:func:`attach_extra_pools`): the kernel reads the pools from then on.

Every other quantization is refused while the layer is built (:func:`check_layer`),
naming it and what is supported; so is the plugin's own ``quant`` on a quantized checkpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod

from vllm_moe_offload.core.config import OffloadConfigError, Quant

logger = logging.getLogger("vllm.moe_offload.quantized_experts")

#: what offload runs, for refusals and the README
SUPPORTED = (
    "unquantized experts (bf16/fp16), FP8 block-quantized experts (quant_method 'fp8' from a serialized "
    "FP8 checkpoint, weight_block_size [n, k], dynamic activation scales, vLLM's CPU FP8 backend CPUExpertsFp8) "
    "and int4 experts run by vLLM's CPU int4 backend CPUExpertsInt4 (quant_method 'awq', bits 4, zero_point true; "
    "quant_method 'gptq', bits 4, desc_act false; quant_method 'compressed-tensors', pack-quantized W4A16: "
    "bits 4, symmetric, strategy 'group'), int8 W8A8 experts (quant_method 'compressed-tensors', per-channel "
    "weights, dynamic per-token activations, vLLM's CPU int8 backend CPUExpertsInt8) and gpt-oss's MXFP4 experts "
    "with their biases (quant_method 'mxfp4', vLLM's CPU MXFP4 backend CPUExpertsMxfp4)"
)

@dataclass(frozen=True)
class ExpertFormat:
    """How a quant method's experts are held in slots."""

    name: str
    #: the layer's per-expert parameters the kernel reads besides ``w13_weight`` / ``w2_weight``
    extra_params: tuple[str, ...]
    #: where the kernel's quant config keeps each of them (checked at attach: the pools must be what it reads)
    kernel_refs: tuple[str, ...]
    #: the parameters vLLM's loader fills with the weights; the kernel reads ``w13_weight`` / ``w2_weight``,
    #: aliases of these after ``process_weights_after_loading`` where they differ
    weight_params: tuple[str, str] = ("w13_weight", "w2_weight")
    #: 4-bit values per stored weight element along the output dimension, stored ``[in, out/pack]`` (AWQ);
    #: None: stored ``[out, in]``, one value an element
    pack_out: int | None = None
    #: the same along the input dimension, stored ``[in/pack, out]`` (GPTQ)
    pack_in: int | None = None
    #: the same along the input dimension, stored ``[out, in/pack]`` (compressed-tensors)
    pack_in_last: int | None = None
    #: the per-expert parameters vLLM's loader fills from the checkpoint besides the weights; None: every one
    #: of ``extra_params`` (compressed-tensors W4A16: its scales; the CPU backend makes the zero points)
    checkpoint_extras: tuple[str, ...] | None = None
    #: vLLM's loader for the holder is the model's own class's (gpt-oss: ``GptOssRoutedExperts.weight_loader``,
    #: shard ids from vLLM's gpt-oss table; integration/gpt_oss.py), not ``RoutedExperts``'
    own_loader: bool = False
    #: the quant method's attribute naming its MoE backend (a kernel store's stamp, and what the conversion is for)
    backend_attr: str = "wna16_moe_backend"

    @property
    def loaded_extras(self) -> tuple[str, ...]:
        return self.extra_params if self.checkpoint_extras is None else self.checkpoint_extras

    def logical_shape(self, stored: tuple[int, ...]) -> tuple[int, ...]:
        """A checkpoint projection's ``[out, in]`` from its stored shape (a 2-D one; others as they are)."""
        if len(stored) != 2:
            return stored
        if self.pack_out is not None:
            return (stored[1] * self.pack_out, stored[0])
        if self.pack_in is not None:
            return (stored[1], stored[0] * self.pack_in)
        if self.pack_in_last is not None:
            return (stored[0], stored[1] * self.pack_in_last)
        return stored


FP8_BLOCK = ExpertFormat(
    "fp8-block", ("w13_weight_scale_inv", "w2_weight_scale_inv"), ("w1_scale", "w2_scale"), backend_attr="fp8_backend",
)


AWQ_INT4 = ExpertFormat(
    "awq-int4", ("w13_scales", "w2_scales", "w13_qzeros", "w2_qzeros"), ("w1_scale", "w2_scale", "w1_zp", "w2_zp"),
    weight_params=("w13_qweight", "w2_qweight"), pack_out=8,  # int32 holds eight 4-bit values
)
#: GPTQ on the CPU backend: zero points even for symmetric checkpoints (vLLM's CPU kernel reads them)
GPTQ_INT4 = ExpertFormat(
    "gptq-int4", AWQ_INT4.extra_params, AWQ_INT4.kernel_refs, weight_params=AWQ_INT4.weight_params, pack_in=8,
)
#: compressed-tensors W4A16 (pack-quantized, symmetric, group): ``w13_weight_packed`` ``[out, in/8]`` and
#: ``w13_weight_scale`` ``[out, in/g]`` from the checkpoint; vLLM's CPU conversion makes the zero points
#: (symmetric: 8 everywhere), which the kernel reads as it reads AWQ's and GPTQ's
CT_W4A16 = ExpertFormat(
    "compressed-tensors-w4a16",
    ("w13_weight_scale", "w2_weight_scale", "w13_weight_zero_point", "w2_weight_zero_point"),
    AWQ_INT4.kernel_refs, weight_params=("w13_weight_packed", "w2_weight_packed"), pack_in_last=8,
    checkpoint_extras=("w13_weight_scale", "w2_weight_scale"), backend_attr="wna16_backend",
)
#: gpt-oss MXFP4 (``GptOssMxfp4MoEMethod``): ``w13_weight`` uint8 ``[2I, H/2]`` (two FP4 values a byte),
#: ``w13_weight_scale`` uint8 ``[2I, H/32]`` (e8m0), ``w13_bias`` ``[2I]``; w2 the same. vLLM's CPU conversion
#: prepacks weights and scales for AMX and turns the biases to float32, which the kernel reads from its quant
#: config as it reads the scales
MXFP4 = ExpertFormat(
    "mxfp4", ("w13_weight_scale", "w2_weight_scale", "w13_bias", "w2_bias"),
    ("w1_scale", "w2_scale", "w1_bias", "w2_bias"), own_loader=True, backend_attr="mxfp4_backend",
)
#: compressed-tensors W8A8 int8 (``CompressedTensorsW8A8Int8MoEMethod``): ``w13_weight`` int8 ``[2I, H]`` and
#: ``w13_weight_scale`` float32 ``[2I, 1]`` per output channel, activations quantized per token in the kernel;
#: vLLM's CPU kernel (``CPUExpertsInt8``) prepacks the weights, the scales stay as loaded
INT8_W8A8 = ExpertFormat(
    "int8-w8a8", ("w13_weight_scale", "w2_weight_scale"), ("w1_scale", "w2_scale"), backend_attr="int8_backend",
)


def expert_format(quant_method, quant_name: str | None = None) -> ExpertFormat | None:
    """The format of ``quant_method``'s experts; None for unquantized ones. A format offload does not
    hold raises NotImplementedError saying which it is (``quant_name``: the checkpoint's quant_method)."""
    from vllm.model_executor.layers.quantization.auto_awq import AutoAWQMoEMethod
    from vllm.model_executor.layers.quantization.auto_gptq import AutoGPTQMoEMethod

    if type(quant_method) is UnquantizedFusedMoEMethod:
        return None
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors_moe.compressed_tensors_moe_wna16 import (  # noqa: E501
        CompressedTensorsWNA16MoEMethod,
    )

    from vllm.model_executor.layers.quantization.mxfp4 import GptOssMxfp4MoEMethod

    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors_moe.compressed_tensors_moe_w8a8_int8 import (  # noqa: E501
        CompressedTensorsW8A8Int8MoEMethod,
    )

    if type(quant_method) is CompressedTensorsW8A8Int8MoEMethod:
        reason, fmt = _int8_refusal(quant_method), INT8_W8A8
    elif type(quant_method) is GptOssMxfp4MoEMethod:
        reason, fmt = _mxfp4_refusal(quant_method), MXFP4
    elif type(quant_method) is CompressedTensorsWNA16MoEMethod:
        reason, fmt = _ct_wna16_refusal(quant_method), CT_W4A16
    elif type(quant_method) is AutoAWQMoEMethod:
        reason, fmt = _awq_refusal(quant_method), AWQ_INT4
    elif type(quant_method) is AutoGPTQMoEMethod:
        reason, fmt = _gptq_refusal(quant_method), GPTQ_INT4
    else:
        reason, fmt = _fp8_refusal(quant_method, quant_name), FP8_BLOCK
    if reason is not None:
        raise NotImplementedError(reason)
    return fmt


def _awq_refusal(quant_method) -> str | None:
    """Why ``quant_method`` (an ``AutoAWQMoEMethod``) is not an AWQ method offload runs (None: it is)."""
    from vllm.model_executor.layers.fused_moe.oracle.int_wna16 import WNA16MoEBackend

    if quant_method.wna16_moe_backend is not WNA16MoEBackend.CPU:
        return f"AWQ int4 experts on the {quant_method.wna16_moe_backend.value} MoE backend"
    if not quant_method.quant_config.zero_point:
        return "AWQ int4 experts without zero points (zero_point false)"
    return None


def _gptq_refusal(quant_method) -> str | None:
    """Why ``quant_method`` (an ``AutoGPTQMoEMethod``) is not a GPTQ method offload runs (None: it is)."""
    from vllm.model_executor.layers.fused_moe.oracle.int_wna16 import WNA16MoEBackend

    config = quant_method.quant_config
    if quant_method.wna16_moe_backend is not WNA16MoEBackend.CPU:
        return f"GPTQ experts on the {quant_method.wna16_moe_backend.value} MoE backend"
    if config.quant_type.size_bits != 4:
        return f"GPTQ experts with {config.quant_type.size_bits} bits"
    if config.desc_act:
        return "GPTQ int4 experts with desc_act (vLLM's CPU int4 MoE kernel has no activation reordering)"
    return None


def _int8_refusal(quant_method) -> str | None:
    """Why ``quant_method`` (a ``CompressedTensorsW8A8Int8MoEMethod``) is not one offload runs (None: it is)."""
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUExpertsInt8
    from vllm.model_executor.layers.fused_moe.oracle.int8 import Int8MoeBackend

    if quant_method.int8_backend is not Int8MoeBackend.CPU or quant_method.experts_cls is not CPUExpertsInt8:
        return (f"int8 W8A8 experts on the {quant_method.int8_backend.value} MoE backend "
                f"({getattr(quant_method.experts_cls, '__name__', None)})")
    return None


def _mxfp4_refusal(quant_method) -> str | None:
    """Why ``quant_method`` (a ``GptOssMxfp4MoEMethod``) is not one offload runs (None: it is)."""
    from vllm.model_executor.layers.fused_moe.oracle.mxfp4 import Mxfp4MoeBackend

    if quant_method.mxfp4_backend is not Mxfp4MoeBackend.CPU:
        return f"gpt-oss MXFP4 experts on the {quant_method.mxfp4_backend.value} MoE backend"
    return None


def _ct_wna16_refusal(quant_method) -> str | None:
    """Why ``quant_method`` (a ``CompressedTensorsWNA16MoEMethod``) is not one offload runs (None: it is)."""
    from vllm.model_executor.layers.fused_moe.oracle.int_wna16 import WNA16MoEBackend

    args = quant_method.weight_quant
    what = f"compressed-tensors W{args.num_bits}A16 experts"
    if quant_method.wna16_backend is not WNA16MoEBackend.CPU:
        return f"{what} on the {quant_method.wna16_backend.value} MoE backend"
    if args.num_bits != 4:
        return f"{what} ({args.num_bits} bits; offload holds 4)"
    if not args.symmetric:
        return f"{what} with zero points (symmetric false; offload holds symmetric ones)"
    if args.strategy != "group":
        return f"{what} with strategy {args.strategy!r} (offload holds 'group')"
    if args.actorder == "group":
        return f"{what} with actorder 'group' (weight_g_idx)"
    return None


def _fp8_refusal(quant_method, quant_name: str | None) -> str | None:
    """Why ``quant_method`` is not an FP8 block method offload runs (None: it is)."""
    from vllm.model_executor.layers.fused_moe.oracle.fp8 import Fp8MoeBackend
    from vllm.model_executor.layers.quantization.fp8 import Fp8MoEMethod

    if type(quant_method) is not Fp8MoEMethod:
        return f"{type(quant_method).__name__} (quantization {quant_name!r})"
    config = quant_method.quant_config
    if not config.is_checkpoint_fp8_serialized:
        return "FP8 experts quantized by vLLM at load (an unquantized checkpoint with --quantization fp8)"
    if not quant_method.block_quant:
        return "FP8 experts with per-tensor weight scales (no weight_block_size)"
    if config.activation_scheme != "dynamic":
        return f"FP8 block experts with activation_scheme {config.activation_scheme!r}"
    if quant_method.fp8_backend is not Fp8MoeBackend.CPU:
        return f"FP8 block experts on the {quant_method.fp8_backend.value} MoE backend"
    if quant_method.weight_scale_refine is not None:
        return "FP8 block experts whose scales vLLM refines for tensor parallelism"
    return None


def check_layer(prefix: str, quant_method, quant_config, offload) -> ExpertFormat | None:
    """The layer's expert format, or a refusal naming the format and what offload supports.

    Runs while vLLM builds the layer, before any expert memory exists.
    ``quant_config``: the model's (None when unquantized).
    """
    quant_name = quant_config.get_name() if quant_config is not None else None
    try:
        fmt = expert_format(quant_method, quant_name)
    except NotImplementedError as exc:
        raise NotImplementedError(
            f"{prefix}: MoE offload cannot hold this layer's experts: {exc}. It supports {SUPPORTED}. "
            "Run without --moe-offload, or with a checkpoint in a supported format."
        ) from None
    if fmt is not None and offload.quant is not Quant.NONE:
        raise OffloadConfigError(
            f"quant {offload.quant.value!r} quantizes bf16/fp16 experts, but {prefix} holds {fmt.name} experts "
            f"(quantization {quant_name!r}) already quantized by the checkpoint; allowed: quant 'none' with a "
            "quantized checkpoint, or quant 'int4' / 'int4+int2' with an unquantized one"
        )
    return fmt


def checkpoint_param_names(layer: torch.nn.Module) -> tuple[str, ...]:
    """The layer's per-expert parameters vLLM's loader fills from the checkpoint: weights (as the quant method
    names them, ``w13_qweight`` for AWQ), then extras."""
    fmt = getattr(layer, "expert_format", None)
    return (*fmt.weight_params, *fmt.loaded_extras) if fmt is not None else ("w13_weight", "w2_weight")


def expert_param_names(layer: torch.nn.Module) -> tuple[str, ...]:
    """The layer's per-expert parameters the kernel reads, in slot-pool order: ``w13_weight``, ``w2_weight``, extras."""
    fmt = getattr(layer, "expert_format", None)
    return ("w13_weight", "w2_weight", *(fmt.extra_params if fmt is not None else ()))


def one_expert_bytes(layer: torch.nn.Module) -> int:
    """One expert's bytes as the kernel reads it (kernel layout, padding included; a quantized layer's
    scales and zero points too), from the layer's one-expert placeholders."""
    return sum(getattr(layer, name)[0].nbytes for name in expert_param_names(layer))


def attach_extra_pools(layer: torch.nn.Module, pools: Sequence[torch.Tensor]) -> None:
    """Put the extra slot pools ``[S, ...]`` in place of the layer's one-expert placeholders.

    The kernel's quant config keeps the placeholder Parameters themselves (vLLM
    builds it from them after loading), so their data is replaced in place; checked
    first, so that a vLLM whose kernel copies them fails here, not with wrong tokens.
    """
    fmt: ExpertFormat = layer.expert_format
    fused = layer.quant_method.moe_kernel.fused_experts
    for name, ref, pool in zip(fmt.extra_params, fmt.kernel_refs, pools, strict=True):
        param = getattr(layer, name)
        if getattr(fused, ref, None) is not param:
            raise RuntimeError(
                f"vllm-moe-offload: {type(fused).__name__}.{ref} is not {layer.layer_name}.{name}; this vLLM's "
                "kernel no longer reads the layer's scale parameters, so slots cannot feed it"
            )
        param.data = pool  # [S, ...]: the same Parameter, the kernel's reference stays valid
    for name, kernel_name in zip(fmt.weight_params, ("w13_weight", "w2_weight")):
        if name != kernel_name:  # vLLM's alias (AWQ: w13_weight is w13_qweight), now of the slot pool
            setattr(layer, name, getattr(layer, kernel_name))
