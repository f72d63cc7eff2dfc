"""Micro-benchmark (not a test): a replacement policy's bookkeeping per layer and step, in µs.

``python scripts/measure/replacement_cost.py``: replays the same random top-k routing
(batch-1 decode, a cache of half the experts, step order) through each policy's
SlotMap at 8 experts (top-2) and 60 experts (top-4), and prints µs per layer-step
next to LRU's, measured in the same run (timings on a shared machine are noisy; the
ratio is the figure to read).
"""

from __future__ import annotations

import random
import time

from vllm_moe_offload.core.cache import SlotMap
from vllm_moe_offload.core.replacement import make_policy


def run(name: str, num_experts: int, top_k: int, steps: int, seed: int = 0) -> float:
    rng = random.Random(seed)
    routing = [rng.sample(range(num_experts), top_k) for _ in range(steps)]  # uniform: many evictions
    slots = SlotMap(num_experts, num_experts // 2, make_policy(name, num_experts, num_experts // 2, top_k))
    start = time.perf_counter()
    for needed in routing:
        if hasattr(slots.policy, "begin_step_tokens"):
            slots.policy.begin_step_tokens([rng.randrange(64)])
        pinned = set(needed)
        for expert in needed:
            hit = slots.slot_of(expert) is not None
            if not hit:
                slots.admit(expert, pinned)
            slots.touch(expert, hit)
        slots.end_step()
    return (time.perf_counter() - start) / steps * 1e6


if __name__ == "__main__":
    for num_experts, top_k in ((8, 2), (60, 4)):
        for name in ("lru", "decay", "nextuse"):
            best = min(run(name, num_experts, top_k, 4000, seed) for seed in range(3))
            print(f"{num_experts:>3} experts, top-{top_k}, {num_experts // 2} slots: {name:<8} {best:7.1f} µs per layer-step")
