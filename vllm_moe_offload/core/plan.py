"""How many expert slots each offloaded layer gets from the budget."""

from __future__ import annotations

from dataclasses import dataclass

from vllm_moe_offload.core.config import Budget, OffloadConfigError, format_bytes


@dataclass(frozen=True)
class SlotPlan:
    """The same number of slots for every MoE layer (an even split of the budget)."""

    slots_per_layer: int
    num_layers: int
    num_experts: int
    expert_bytes: int
    budget_bytes: int

    @property
    def slot_bytes(self) -> int:
        """Bytes held by every layer's slots together; never above ``budget_bytes``."""
        return self.slots_per_layer * self.num_layers * self.expert_bytes

    @property
    def total_expert_bytes(self) -> int:
        return self.num_experts * self.num_layers * self.expert_bytes

    @property
    def fully_resident(self) -> bool:
        return self.slots_per_layer >= self.num_experts


def minimum_bytes(num_layers: int, top_k: int, expert_bytes: int) -> int:
    """Smallest budget one step can run with: ``top_k`` slots in every MoE layer.

    A token needs its ``top_k`` experts resident at once, and a step visits every
    layer, so no budget below this can compute even a single token.
    """
    return num_layers * top_k * expert_bytes


def plan_slots(budget: Budget, num_layers: int, num_experts: int, top_k: int, expert_bytes: int) -> SlotPlan:
    """Split ``budget`` evenly over ``num_layers`` layers of ``num_experts`` experts.

    A budget above the model's expert bytes is capped at everything resident.
    Raises :class:`OffloadConfigError` naming the minimum in bytes when the
    budget cannot give every layer ``top_k`` slots.
    """
    if num_layers < 1 or num_experts < 1 or expert_bytes < 1 or not 1 <= top_k <= num_experts:
        raise ValueError(
            f"bad model geometry: {num_layers} layers, {num_experts} experts, top_k {top_k}, "
            f"{expert_bytes} bytes per expert"
        )
    total = num_layers * num_experts * expert_bytes
    budget_bytes = budget.resolve(total)
    slots = min(num_experts, budget_bytes // (num_layers * expert_bytes))
    minimum = minimum_bytes(num_layers, top_k, expert_bytes)
    if slots < top_k:
        raise OffloadConfigError(
            f"budget {budget} ({budget_bytes} bytes) is below the minimum one step needs: "
            f"{minimum} bytes ({format_bytes(minimum)}: top_k={top_k} experts x {num_layers} MoE layers x "
            f"{expert_bytes} bytes per expert); allowed: {minimum} to {total} bytes "
            f"({100 * top_k / num_experts:.4g}% to 100% of expert bytes)"
        )
    return SlotPlan(slots, num_layers, num_experts, expert_bytes, budget_bytes)
