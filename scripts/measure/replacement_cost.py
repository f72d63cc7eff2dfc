"""Micro-benchmark (not a test): a replacement policy's bookkeeping per layer and step, in µs.

``python scripts/measure/replacement_cost.py``: replays the same random top-k routing
(batch-1 decode, a cache of half the experts, step order) through each policy's
SlotMap at 8 experts (top-2) and 60 experts (top-4), and prints µs per layer-step
next to LRU's, measured in the same run (timings on a shared machine are noisy; the
ratio is the figure to read). ``nextuse+paths``: ``nextuse`` with the layers of a
model linked (``predictive.link_layers``, as the simulator runs it), 8 layers
stepped in order, the cost per layer-step.
"""

from __future__ import annotations

import random
import time

from vllm_moe_offload.core.cache import SlotMap
from vllm_moe_offload.core.predictive import link_layers
from vllm_moe_offload.core.replacement import make_policy

LINKED_LAYERS = 8


def run(name: str, num_experts: int, top_k: int, steps: int, seed: int = 0) -> float:
    rng = random.Random(seed)
    routing = [rng.sample(range(num_experts), top_k) for _ in range(steps)]  # uniform: many evictions
    slots = SlotMap(num_experts, num_experts // 2, make_policy(name, num_experts, num_experts // 2, top_k))
    start = time.perf_counter()
    for needed in routing:
        if hasattr(slots.policy, "begin_step_tokens"):
            slots.policy.begin_step_tokens([rng.randrange(64)])
        _serve(slots, needed)
        slots.end_step()
    return (time.perf_counter() - start) / steps * 1e6


def _serve(slots: SlotMap, needed: list[int]) -> None:
    """One layer's pass: its experts pinned, each a hit or admitted."""
    pinned = set(needed)
    for expert in needed:
        hit = slots.slot_of(expert) is not None
        if not hit:
            slots.admit(expert, pinned)
        slots.touch(expert, hit)


def run_linked(num_experts: int, top_k: int, steps: int, seed: int = 0) -> float:
    """``nextuse`` over ``LINKED_LAYERS`` linked layers; µs per layer-step."""
    rng = random.Random(seed)
    capacity = num_experts // 2
    layers = [SlotMap(num_experts, capacity, make_policy("nextuse", num_experts, capacity, top_k)) for _ in range(LINKED_LAYERS)]
    link_layers([slots.policy for slots in layers], num_experts)
    routing = [[rng.sample(range(num_experts), top_k) for _ in layers] for _ in range(steps)]
    start = time.perf_counter()
    for step in routing:
        token = rng.randrange(64)
        for slots, needed in zip(layers, step):
            slots.policy.begin_step_tokens([token])
            slots.policy.begin_pass_needs(needed)
            _serve(slots, needed)
        for slots in layers:
            slots.end_step()
    return (time.perf_counter() - start) / (steps * LINKED_LAYERS) * 1e6


if __name__ == "__main__":
    for num_experts, top_k in ((8, 2), (60, 4)):
        for name in ("lru", "decay", "nextuse"):
            best = min(run(name, num_experts, top_k, 4000, seed) for seed in range(3))
            print(f"{num_experts:>3} experts, top-{top_k}, {num_experts // 2} slots: {name:<8} {best:7.1f} µs per layer-step")
        best = min(run_linked(num_experts, top_k, 1000, seed) for seed in range(3))
        print(f"{num_experts:>3} experts, top-{top_k}, {num_experts // 2} slots: nextuse+paths {best:7.1f} µs per layer-step")
