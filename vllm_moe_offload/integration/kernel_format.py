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

import torch
from vllm.model_executor.layers.fused_moe.oracle.unquantized import (
    UnquantizedMoeBackend,
    convert_to_unquantized_kernel_format,
)

from vllm_moe_offload.runtime.tiers import Converter

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


def make_converter(layer: torch.nn.Module) -> Converter:
    """A function (w1, w3, w2) -> (w13, w2) in ``layer``'s kernel layout for this TP rank, on the host.

    The inputs are the checkpoint's full (unsharded) projections; the output is
    this rank's shard, the same bytes vLLM's loader would have put in the layer.
    """
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
    fused_experts = quant_method.moe_kernel.fused_experts
    dtype = layer.params_dtype
    moe = layer.moe_config
    # the loader's shapes for one expert: per-partition (and possibly rounded-up) sizes
    inter, hidden = layer.intermediate_size_per_partition, layer.hidden_size
    w13_rows = 2 * inter if moe.is_act_and_mul else inter

    def convert(w1: torch.Tensor, w3: torch.Tensor | None, w2: torch.Tensor):
        w13 = torch.zeros(w13_rows, hidden, dtype=dtype)  # [2I/tp, H]: gate rows, then up rows
        w2k = torch.zeros(hidden, inter, dtype=dtype)  # [H, I/tp]
        for shard_id, weight, dest in (("w1", w1, w13), ("w3", w3, w13), ("w2", w2, w2k)):
            if weight is None:
                continue
            # vLLM's own path: narrows the checkpoint tensor to this rank's shard
            # (and, for w1/w3, the destination to its half), then copies.
            getattr(layer, _LOAD_ONE)(
                shard_dim=_SHARD_DIM[shard_id], expert_data=dest, shard_id=shard_id,
                loaded_weight=weight.to(dtype), tp_rank=moe.tp_rank,
            )
        holder = _OneExpert(
            layer, *convert_to_unquantized_kernel_format(backend, moe, w13[None], w2k[None])  # [1, ...]
        )
        fused_experts.process_weights_after_loading(holder)  # pads / prepacks in place
        return holder.w13_weight.data[0], holder.w2_weight.data[0]

    return convert
