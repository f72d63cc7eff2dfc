"""The replacement policies by name: the one place that knows every policy class.

``core/cache.py`` defines the contract and the plain policies (LRU, Load-on-Demand);
``core/arc.py``, ``core/frequency.py`` and ``core/predictive.py`` add the others. Configuration, the
simulator and the runtime pick a policy by name here.
"""

from __future__ import annotations

from vllm_moe_offload.core.arc import ARCPolicy
from vllm_moe_offload.core.cache import LRUPolicy, OnDemandPolicy, ReplacementPolicy
from vllm_moe_offload.core.frequency import FREQUENCY_POLICIES
from vllm_moe_offload.core.predictive import PREDICTIVE_POLICIES

FREQUENCY_POLICY_NAMES = tuple(FREQUENCY_POLICIES)
PREDICTIVE_POLICY_NAMES = tuple(PREDICTIVE_POLICIES)

POLICY_NAMES = frozenset(
    {OnDemandPolicy.name, LRUPolicy.name, ARCPolicy.name, *FREQUENCY_POLICY_NAMES, *PREDICTIVE_POLICY_NAMES}
)

#: policies that replace over the whole budget (all but ``ondemand``): the ``replacement`` setting's values
REPLACEMENT_NAMES = (LRUPolicy.name, ARCPolicy.name, *FREQUENCY_POLICY_NAMES, *PREDICTIVE_POLICY_NAMES)


def make_policy(name: str, num_experts: int, capacity: int, top_k: int) -> ReplacementPolicy:
    """Build the replacement policy registered under ``name``."""
    if name == OnDemandPolicy.name:
        return OnDemandPolicy(num_experts, capacity, scratch=top_k)
    if name == LRUPolicy.name:
        return LRUPolicy(num_experts, capacity)
    if name == ARCPolicy.name:
        return ARCPolicy(num_experts, capacity)
    if name in FREQUENCY_POLICIES:
        return FREQUENCY_POLICIES[name](num_experts, capacity)
    if name in PREDICTIVE_POLICIES:
        return PREDICTIVE_POLICIES[name](num_experts, capacity)
    raise ValueError(f"unknown cache policy {name!r}; allowed: {sorted(POLICY_NAMES)}")
