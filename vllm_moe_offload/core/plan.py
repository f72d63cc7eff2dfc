"""How many expert slots each offloaded layer gets from the budget."""

from __future__ import annotations

from dataclasses import dataclass

from vllm_moe_offload.core.config import Budget, OffloadConfigError, format_bytes


@dataclass(frozen=True)
class SlotPlan:
    """Slots of every MoE layer, in layer order; their bytes never exceed ``budget_bytes``."""

    layer_slots: tuple[int, ...]
    num_experts: int
    expert_bytes: int
    budget_bytes: int

    @property
    def num_layers(self) -> int:
        return len(self.layer_slots)

    @property
    def slots_per_layer(self) -> int:
        """Slots of the layers that are not fully resident (all layers when the split is even)."""
        return min(self.layer_slots)

    @property
    def resident_layers(self) -> int:
        """Leading layers given every expert while later layers offload (shallow-favoring)."""
        if self.fully_resident:
            return 0
        return next(i for i, slots in enumerate(self.layer_slots) if slots < self.num_experts)

    @property
    def slot_bytes(self) -> int:
        """Bytes held by every layer's slots together; never above ``budget_bytes``."""
        return sum(self.layer_slots) * self.expert_bytes

    @property
    def total_expert_bytes(self) -> int:
        return self.num_experts * self.num_layers * self.expert_bytes

    @property
    def fully_resident(self) -> bool:
        return all(slots >= self.num_experts for slots in self.layer_slots)


def minimum_bytes(num_layers: int, top_k: int, expert_bytes: int) -> int:
    """Smallest budget one step can run with: ``top_k`` slots in every MoE layer.

    A token needs its ``top_k`` experts resident at once, and a step visits every
    layer, so no budget below this can compute even a single token.
    """
    return num_layers * top_k * expert_bytes


def plan_slots(
    budget: Budget, num_layers: int, num_experts: int, top_k: int, expert_bytes: int, resident_layers: int = 0,
    min_rest_slots: int | None = None,
) -> SlotPlan:
    """Split ``budget`` over ``num_layers`` layers of ``num_experts`` experts.

    The first ``resident_layers`` layers get every expert (Fate's shallow-favoring
    split: shallow layers predict worst) as long as each later layer keeps at
    least ``min_rest_slots`` (default ``top_k``) slots; fewer leading layers are
    made resident otherwise. The
    rest of the budget is split evenly. A budget above the model's expert bytes
    is capped at everything resident. Raises :class:`OffloadConfigError` naming
    the minimum in bytes when the budget cannot give every layer ``top_k`` slots.
    """
    if num_layers < 1 or num_experts < 1 or expert_bytes < 1 or not 1 <= top_k <= num_experts:
        raise ValueError(
            f"bad model geometry: {num_layers} layers, {num_experts} experts, top_k {top_k}, "
            f"{expert_bytes} bytes per expert"
        )
    total = num_layers * num_experts * expert_bytes
    budget_bytes = budget.resolve(total)
    even = min(num_experts, budget_bytes // (num_layers * expert_bytes))
    minimum = minimum_bytes(num_layers, top_k, expert_bytes)
    if even < top_k:
        raise OffloadConfigError(
            f"budget {budget} ({budget_bytes} bytes) is below the minimum one step needs: "
            f"{minimum} bytes ({format_bytes(minimum)}: top_k={top_k} experts x {num_layers} MoE layers x "
            f"{expert_bytes} bytes per expert); allowed: {minimum} to {total} bytes "
            f"({100 * top_k / num_experts:.4g}% to 100% of expert bytes)"
        )
    layer_slots = [even] * num_layers
    slots_total = budget_bytes // expert_bytes
    for resident in range(min(resident_layers, num_layers - 1), 0, -1):
        if even >= num_experts:
            break
        rest = min(num_experts, (slots_total - resident * num_experts) // (num_layers - resident))
        if rest >= max(top_k, min_rest_slots or 0):
            layer_slots = [num_experts] * resident + [rest] * (num_layers - resident)
            break
    return SlotPlan(tuple(layer_slots), num_experts, expert_bytes, budget_bytes)
