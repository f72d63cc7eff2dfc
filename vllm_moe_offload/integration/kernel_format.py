"""Turning one expert's checkpoint tensors into this rank's kernel layout.

vLLM loads a layer in two stages: ``weight_loader`` copies each checkpoint
projection into ``w13_weight [E, 2I/tp, H]`` / ``w2_weight [E, H, I/tp]``,
keeping this tensor-parallel rank's shard (rows of w1/w3, columns of w2) and
zero-filling any padding; then ``process_weights_after_loading`` converts the
whole layer (padding, CPU prepacking). The slot pool needs the same result one
expert at a time, so we run vLLM's own per-expert loading helper into a
one-expert buffer and its own conversion on a one-expert holder module. This is
exact because both stages are per-expert separable (checked by the end-to-end
token-equality tests, tensor parallel included).
"""

from __future__ import annotations

import logging

import torch
from vllm.model_executor.layers.fused_moe.oracle.unquantized import (
    UnquantizedMoeBackend,
    convert_to_unquantized_kernel_format,
)

from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

from vllm_moe_offload.integration.quantized_conversion import QuantizedExpertConverter
from vllm_moe_offload.runtime.tiers import Converter, Into, Scratch

logger = logging.getLogger("vllm.moe_offload.kernel_format")

#: backends whose per-expert conversion is vLLM's own and needs no global state
SUPPORTED_BACKENDS = (UnquantizedMoeBackend.CPU, UnquantizedMoeBackend.TRITON)

#: the dimension of the intermediate (sharded) axis of each checkpoint projection,
#: as in ``RoutedExperts.weight_loader``: w1/w3 are column parallel, w2 row parallel
_SHARD_DIM = {"w1": 0, "w3": 0, "w2": 1}


#: vLLM's loader step for one projection of one expert: narrows to the rank's shard, zero-fills padding
_LOAD_ONE = "_load_model_weight_or_group_weight_scale"


class _OneExpert(torch.nn.Module):
    """What ``process_weights_after_loading`` of the experts kernel reads from a layer."""

    def __init__(self, layer: torch.nn.Module, w13: torch.Tensor, w2: torch.Tensor) -> None:
        super().__init__()
        self.moe_config = layer.moe_config
        self.activation = layer.activation
        self.w13_weight = torch.nn.Parameter(w13, requires_grad=False)
        self.w2_weight = torch.nn.Parameter(w2, requires_grad=False)


def make_converter(layer: torch.nn.Module, scratch: Scratch | None = None) -> Converter:
    """A function (w1, w3, w2, into) -> (w13, w2) in ``layer``'s kernel layout for this TP rank, on the host.

    The inputs are the checkpoint's full (unsharded) projections; the output is
    this rank's shard, the same bytes vLLM's loader would have put in the layer,
    written into ``into`` where the conversion can (see :func:`_prepack_isa`),
    else in fresh tensors. The loader's one-expert buffers come from ``scratch``
    (reused, see ``ThreadLocalReaders.scratch``) when given.
    """
    if layer.expert_format is not None:  # quantized experts: vLLM's loader and conversion on a one-expert holder
        return QuantizedExpertConverter(layer, layer.create_one_expert, scratch)
    quant_method = layer.quant_method
    backend = quant_method.unquantized_backend
    if backend not in SUPPORTED_BACKENDS:
        raise NotImplementedError(
            f"{layer.layer_name}: MoE offload supports the {[b.value for b in SUPPORTED_BACKENDS]} "
            f"MoE backends; this layer uses {backend.value} (try --moe-backend triton on CUDA)"
        )
    if not callable(getattr(layer, _LOAD_ONE, None)):
        raise RuntimeError(
            f"vllm-moe-offload: RoutedExperts.{_LOAD_ONE} is missing; this vLLM is not supported "
            "(the per-expert conversion reuses it to take this rank's shard)"
        )
    return _ExpertConverter(layer, backend, scratch)


def conversion_identity(convert: Converter) -> dict:
    """What the bytes ``convert`` writes depend on besides versions, shapes and the rank (a kernel store's stamp)."""
    experts = convert.fused_experts
    return {
        "backend": convert.backend.value, "experts": f"{type(experts).__module__}.{type(experts).__qualname__}",
        "isa": getattr(experts, "isa", None),
    }


def describe_conversion(convert: Converter | None) -> str | None:
    """How ``convert`` brings experts to kernel layout; None before its first load decided it.

    ``convert`` None: the host tier, converted once at start-up.
    """
    if convert is None:
        return "none (host tier, converted at start-up)"
    isa = getattr(convert, "prepack_isa", None)
    if isa is None:
        return "vLLM's conversion, copied into the slot"
    if not convert.checked:
        return None
    return f"prepacked into the slots ({isa})" + (", straight from the read" if convert.from_read else "")


class _ExpertConverter:
    """See :func:`make_converter`. ``prepack_isa``: the direct prepack's ISA, None when vLLM converts.

    ``from_read``: the prepack reads the checkpoint's projections where they were read (the read
    buffer), skipping vLLM's loader and its one-expert buffers, because the loader would only copy
    them (one rank, no padding, the layer's dtype) and prepacking gate and up separately gives the
    same bytes (checked on the first expert, as the prepack itself is).
    """

    def __init__(self, layer: torch.nn.Module, backend: UnquantizedMoeBackend, scratch: Scratch | None) -> None:
        self.layer = layer
        self.backend = backend
        self.scratch = scratch
        self.fused_experts = layer.quant_method.moe_kernel.fused_experts
        self.dtype = layer.params_dtype
        moe = layer.moe_config
        # the loader's shapes for one expert: per-partition (and possibly rounded-up) sizes
        inter, hidden = layer.intermediate_size_per_partition, layer.hidden_size
        self.w13_shape = (2 * inter if moe.is_act_and_mul else inter, hidden)  # [2I/tp, H]: gate, then up rows
        self.w2_shape = (hidden, inter)  # [H, I/tp]
        self.prepack_isa = _prepack_isa(self.fused_experts, moe, self.w13_shape, self.w2_shape)
        self.checked = False  # the direct prepack is used once the first expert matched vLLM's conversion
        self.from_read = False

    def __call__(self, w1: torch.Tensor, w3: torch.Tensor | None, w2: torch.Tensor, into: Into = None):
        isa = self.prepack_isa
        if self.from_read and self._loader_would_copy(w1, w3, w2):
            return _prepack_projections(isa, (w1, w3), w2, into, self.w13_shape)
        w13, w2k = self._load(w1, w3, w2)
        if isa is not None and self.checked:
            return _prepack(isa, w13, w2k, into)
        out = self._vllm_conversion(w13, w2k)
        if isa is not None:  # the first expert: does the direct prepack give vLLM's bytes?
            self.checked = True
            if not all(torch.equal(a, b) for a, b in zip(_prepack(isa, w13, w2k, None), out)):
                self.prepack_isa = None
                logger.info("%s: prepacking experts straight into their slots does not give vLLM's bytes; "
                            "converting through vLLM instead (a fresh tensor per load)", self.layer.layer_name)
            elif self._loader_would_copy(w1, w3, w2):  # and from the read, gate and up apart?
                got = _prepack_projections(isa, (w1, w3), w2, None, self.w13_shape)
                self.from_read = all(torch.equal(a, b) for a, b in zip(got, out))
        return out

    def _loader_would_copy(self, w1: torch.Tensor, w3: torch.Tensor | None, w2: torch.Tensor) -> bool:
        """vLLM's loader would only copy these projections into its buffers: one rank, gate and up
        filling ``w13`` exactly (no padding), the layer's dtype, contiguous as the prepack reads them."""
        return (
            self.layer.moe_config.tp_size == 1 and w3 is not None
            and tuple(w1.shape) == tuple(w3.shape) == (self.w13_shape[0] // 2, self.w13_shape[1])
            and tuple(w2.shape) == self.w2_shape
            and all(w.dtype == self.dtype and w.is_contiguous() for w in (w1, w3, w2))
        )

    def _buffer(self, name: str, shape: tuple[int, int]) -> torch.Tensor:
        # the first expert (the checks) gets fresh buffers: loads prepacked from the read never grow the scratch
        if self.scratch is None or (self.prepack_isa is not None and not self.checked):
            return torch.zeros(shape, dtype=self.dtype)
        return self.scratch(name, shape, self.dtype).zero_()  # the loader leaves padding untouched

    def _load(self, w1: torch.Tensor, w3: torch.Tensor | None, w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """vLLM's loader into one-expert buffers: this rank's shard, before the kernel's conversion."""
        w13, w2k = self._buffer("w13", self.w13_shape), self._buffer("w2", self.w2_shape)
        for shard_id, weight, dest in (("w1", w1, w13), ("w3", w3, w13), ("w2", w2, w2k)):
            if weight is None:
                continue
            # vLLM's own path: narrows the checkpoint tensor to this rank's shard
            # (and, for w1/w3, the destination to its half), then copies.
            getattr(self.layer, _LOAD_ONE)(
                shard_dim=_SHARD_DIM[shard_id], expert_data=dest, shard_id=shard_id,
                loaded_weight=weight.to(self.dtype), tp_rank=self.layer.moe_config.tp_rank,
            )
        return w13, w2k

    def _vllm_conversion(self, w13: torch.Tensor, w2k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        moe = self.layer.moe_config
        holder = _OneExpert(
            self.layer, *convert_to_unquantized_kernel_format(self.backend, moe, w13[None], w2k[None])  # [1, ...]
        )
        self.fused_experts.process_weights_after_loading(holder)  # pads / prepacks in place
        out13, out2 = holder.w13_weight.data[0], holder.w2_weight.data[0]
        return _not_in(out13, w13), _not_in(out2, w2k)


def _prepack_isa(fused_experts, moe, w13_shape: tuple[int, int], w2_shape: tuple[int, int]) -> str | None:
    """The ISA for prepacking one expert straight into its slot, when that is all vLLM's conversion does.

    vLLM's CPU experts convert a layer by padding the intermediate dimension
    (when the kernel needs it) and prepacking each weight into a fresh tensor.
    Without padding, calling the prepack op on the slot itself gives the same
    bytes without the fresh tensor, whose page faults cost more than the rest of
    the conversion here (2.7 ms per 3 MiB, against 0.1 ms for writing existing
    memory). The first conversion checks the bytes against vLLM's own path.
    """
    if type(fused_experts).process_weights_after_loading is not CPUUnquantizedExperts.process_weights_after_loading:
        return None  # another backend, or a subclass that converts differently
    if getattr(fused_experts, "_use_zentorch", True):  # set by vLLM's conversion of the layer at load time
        return None
    if not callable(getattr(fused_experts, "_padded_intermediate_size", None)):  # another vLLM: convert through it
        return None
    padded = fused_experts._padded_intermediate_size(moe)
    if padded != moe.intermediate_size_per_partition or w2_shape[1] != padded or w13_shape[0] % padded:
        return None
    if not hasattr(torch.ops._C, "prepack_moe_weight"):
        return None
    return fused_experts.isa


def _prepack(isa: str, w13: torch.Tensor, w2k: torch.Tensor, into: Into) -> tuple[torch.Tensor, torch.Tensor]:
    """``w13`` [2I, H] and ``w2k`` [H, I] prepacked for the CPU kernel, into ``into`` when given."""
    out = into if into is not None else (torch.empty_like(w13), torch.empty_like(w2k))
    for src, dst in zip((w13, w2k), out):
        torch.ops._C.prepack_moe_weight(src[None], dst[None], isa)  # [1, N, K], as vLLM packs a layer
    return out[0], out[1]


def _prepack_projections(
    isa: str, gate_up: tuple[torch.Tensor, torch.Tensor], w2: torch.Tensor, into: Into, w13_shape: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate and up ``[I, H]`` each prepacked into their halves of ``w13`` ``[2I, H]``, ``w2`` ``[H, I]`` into its
    own, into ``into`` when given: the checkpoint's tensors as read, no ``[2I, H]`` copy of them first."""
    out = into if into is not None else (torch.empty(w13_shape, dtype=w2.dtype), torch.empty_like(w2))
    half = w13_shape[0] // 2
    for src, dst in zip((*gate_up, w2), (out[0][:half], out[0][half:], out[1])):
        torch.ops._C.prepack_moe_weight(src[None], dst[None], isa)  # [1, N, K]
    return out[0], out[1]


def _not_in(out: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """``out``, copied when it still lies in ``buffer`` (a backend that converts in place or not at all)."""
    same = out.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
    return out.clone() if same else out
