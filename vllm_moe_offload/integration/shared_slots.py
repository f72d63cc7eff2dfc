"""The slot pool shared by the offloaded layers (``pool = shared``, ``core/shared_pool.py``): when, and its tensors.

The setup (``integration/setup.py``) asks :func:`shared_pool` once, before it builds each layer's
:class:`~vllm_moe_offload.runtime.slots.LayerSlots`; a layer of the pool gets its view and the pool's tensors.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from vllm_moe_offload.core.config import OffloadConfig, OffloadConfigError, Policy, Pool, Quant
from vllm_moe_offload.core.plan import SlotPlan
from vllm_moe_offload.core.shared_pool import SharedPool
from vllm_moe_offload.integration.quantized_experts import expert_param_names, one_expert_bytes
from vllm_moe_offload.runtime.ledger import BudgetLedger, MemoryKind
from vllm_moe_offload.runtime.slots import slot_pool

logger = logging.getLogger("vllm.moe_offload.setup")


@dataclass
class SharedSlots:
    """One slot pool for the offloaded layers (``pool = shared``): its bookkeeping and tensors."""

    pool: SharedPool
    tensors: list[torch.Tensor]  # [S, ...] each: w13, w2 and a quantized layer's scales
    ordinal: dict[str, int]  # layer name -> its view of the pool


def shared_pool(layers, plan: SlotPlan, config: OffloadConfig, ledger: BudgetLedger) -> SharedSlots | None:
    """The shared pool of the layers the plan gives fewer slots than experts; None for pools per layer.

    Layers the plan keeps whole keep their own pool (every expert in the slot of its id). Every shared layer
    must hold experts of one shape and dtype: one slot takes any layer's expert.
    """
    if config.pool is Pool.LAYER or (config.pool is Pool.AUTO and not _shared_by_default(layers, config)):
        return None
    shared = [(layer, n) for layer, n in zip(layers, plan.layer_slots) if n < plan.num_experts]
    if len(shared) < 2:
        logger.info("MoE offload: pool 'shared' has %d offloaded layer(s) to share; each keeps its own pool",
                    len(shared))
        return None
    # [1, ...] placeholders in kernel layout of each shared layer: w13, w2 and a quantized layer's scales
    placeholders = [[getattr(layer, name) for name in expert_param_names(layer)] for layer, _ in shared]
    shapes = {tuple((tuple(p.shape[1:]), p.dtype) for p in params) for params in placeholders}
    if len(shapes) > 1:
        raise OffloadConfigError(
            "pool 'shared' needs every offloaded MoE layer's experts in one shape and dtype; this model's differ "
            f"({len(shapes)} kinds); use pool 'layer'"
        )
    first = shared[0][0]
    num_slots = sum(n for _, n in shared)
    ledger.reserve(MemoryKind.SLOTS, num_slots * one_expert_bytes(first),
                   f"the slot pool shared by {len(shared)} layers ({num_slots} slots)")
    tensors = [slot_pool(num_slots, tuple(p.shape[1:]), p.dtype, p.device) for p in placeholders[0]]
    pool = SharedPool(len(shared), plan.num_experts, num_slots, first.top_k)
    return SharedSlots(pool, tensors, {layer.layer_name: i for i, (layer, _) in enumerate(shared)})


def _shared_by_default(layers, config: OffloadConfig) -> bool:
    """``pool = auto``: shared where the bench measured it (full-precision experts, host slots), else layer.

    A quantized kernel's layers carry per-expert scales beside the weights, and CUDA slots take another
    copy path: both work with a shared pool in principle, neither has been measured with one. ``ondemand``
    (the papers' baseline) keeps its fixed resident set and scratch slots per layer, and a ``replacement``
    the user chose keeps the pools per layer it evicts in (in a shared pool the pool's rule evicts).
    """
    first = layers[0]
    return (config.policy is not Policy.ONDEMAND and config.replacement is None and config.quant is Quant.NONE
            and first.w13_weight.device.type == "cpu"
            and getattr(first, "expert_format", None) is None)
