"""Replacement policies beyond ``cache.py``'s, and one factory for all of them.

Kept apart from ``cache.py`` so the runtime's factory (``make_policy``) only
offers what the runtime supports; the simulator asks :func:`make_sim_policy`.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from vllm_moe_offload.core.belady import BeladyPolicy
from vllm_moe_offload.core.cache import ReplacementPolicy
from vllm_moe_offload.core.replacement import FREQUENCY_POLICY_NAMES, PREDICTIVE_POLICY_NAMES, make_policy


class LFUPolicy(ReplacementPolicy):
    """Least frequently used; ties go to the least recently used.

    Counts survive eviction ("perfect" LFU, as MoE-Infinity keeps activation
    counts per expert), so an expert popular long ago re-enters with its count.
    An expert never accessed counts 0 and leaves first.
    """

    name = "lfu"

    def __init__(self, num_experts: int, capacity: int) -> None:
        super().__init__(num_experts, capacity)
        self._count = [0] * num_experts
        self._last = [-1] * num_experts
        self._clock = 0

    def on_access(self, expert: int, hit: bool) -> None:
        self._count[expert] += 1
        self._last[expert] = self._clock
        self._clock += 1

    def on_evict(self, expert: int) -> None:
        pass

    def choose_victim(self, resident: Collection[int], pinned: Collection[int]) -> int:
        candidates = [e for e in resident if e not in pinned]
        return min(candidates, key=lambda e: (self._count[e], self._last[e], e))


#: cache policies the simulator can replay
SIM_POLICY_NAMES = ("lru", "lfu", "arc", *FREQUENCY_POLICY_NAMES, *PREDICTIVE_POLICY_NAMES, "ondemand", "belady")


def make_sim_policy(
    name: str,
    num_experts: int,
    capacity: int,
    top_k: int,
    accesses: Sequence[Collection[int]] = (),
) -> ReplacementPolicy:
    """Build a policy by name; ``accesses`` (the layer's future passes) feeds Belady only."""
    if name == LFUPolicy.name:
        return LFUPolicy(num_experts, capacity)
    if name == BeladyPolicy.name:
        return BeladyPolicy(num_experts, capacity, accesses)
    if name in SIM_POLICY_NAMES:
        return make_policy(name, num_experts, capacity, top_k)
    raise ValueError(f"unknown cache policy {name!r}; allowed: {list(SIM_POLICY_NAMES)}")
