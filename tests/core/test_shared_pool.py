"""One slot pool for every layer (core/shared_pool.py): its laws, its victims, and replays of real routing."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from vllm_moe_offload.core.cache import LRUPolicy, SlotMap
from vllm_moe_offload.core.config import OffloadConfig, OffloadConfigError, Pool
from vllm_moe_offload.core import shared_pool
from vllm_moe_offload.core.shared_pool import SharedPool, serve_step
from vllm_moe_offload.core.traces import load_trace

HUMANEVAL = Path(__file__).resolve().parents[2].parent / "shared" / "traces" / "mixtral-8x7b-humaneval-decode.jsonl"


def make_pool(layers: int = 4, experts: int = 8, slots: int = 8, top_k: int = 2) -> SharedPool:
    pool = SharedPool(layers, experts, slots, top_k)
    for view in pool.views:
        view.attach(LRUPolicy(experts, max(1, slots // layers)))
    return pool


def use(pool: SharedPool, ordinal: int, experts: list[int]) -> int:
    """One step of layer ``ordinal`` needing ``experts`` (pinned together); returns its misses."""
    pool.begin_layer(ordinal)
    return serve_step(pool.view(ordinal), experts)


def test_sizes():
    pool = make_pool(layers=8, experts=16, slots=32)
    assert pool.pass_capacity == 16 and pool.in_flight_allowance == 16
    assert make_pool(layers=8, experts=16, slots=16).pass_capacity == 8
    assert make_pool(layers=2, experts=8, slots=4).pass_capacity == 2  # never under top_k
    with pytest.raises(ValueError, match="fewer than every expert"):
        SharedPool(2, 8, 16, 2)
    with pytest.raises(ValueError, match="at least top_k"):
        SharedPool(2, 8, 1, 2)


def test_never_more_than_its_slots_and_every_slot_one_expert():
    rng = random.Random(0)
    pool = make_pool(layers=4, experts=8, slots=8)
    for _ in range(2000):
        ordinal = rng.randrange(4)
        use(pool, ordinal, rng.sample(range(8), rng.randint(1, pool.pass_capacity)))
        slots = [s for view in pool.views for s in view.resident().values()]
        assert len(slots) == len(set(slots)) <= 8
        assert len(slots) + pool.free_slots() == 8


def test_a_layer_takes_more_than_its_share():
    pool = make_pool(layers=4, experts=8, slots=8)  # share 2, pass capacity 4
    use(pool, 0, [0, 1, 2, 3])
    assert len(pool.view(0)) == 4
    use(pool, 1, [4, 5, 6, 7])  # takes the free slots, then evicts nothing of its own
    assert len(pool.view(1)) == 4 and len(pool.view(0)) == 4


def test_victims_never_pinned_loading_or_of_the_running_layer():
    pool = make_pool(layers=2, experts=8, slots=4)
    use(pool, 0, [0, 1])
    use(pool, 1, [2, 3])
    # layer 1 runs; a prefetch into layer 0 may not take layer 1's experts, and layer 0's own are pinned
    pool.begin_layer(1)
    with pytest.raises(RuntimeError, match="shared pool"):
        pool.view(0).admit(4, pinned=[0, 1])
    assert pool.view(0).resident_keys() == [0, 1] and pool.view(1).resident_keys() == [2, 3]  # nothing changed
    # layer 1's load of expert 2 is in flight: it holds its slot even when layer 0 runs
    pool.view(1).loading = lambda: {2}
    pool.begin_layer(0)
    evicted = []
    pool.view(1).on_evicted = evicted.append
    pool.view(0).admit(5, pinned=[0, 1, 5])
    assert evicted == [3] and pool.view(1).resident_keys() == [2]


def test_a_prefetch_spares_what_any_layer_finds_useful():
    pool = make_pool(layers=2, experts=8, slots=4)
    use(pool, 0, [0, 1])
    use(pool, 1, [2, 3])  # all four used within the last step: useful to LRU's rule
    pool.begin_layer(0)
    with pytest.raises(RuntimeError, match="useful"):
        pool.view(1).admit(6, spare_useful=True)
    pool.view(1).admit(6, pinned=[6])  # a demand load evicts all the same


def test_the_victim_is_the_expert_expected_farthest():
    pool = make_pool(layers=2, experts=8, slots=6)  # share 3, pass capacity 3
    for _ in range(10):
        use(pool, 0, [0, 1])  # layer 0 uses 0 and 1 every step
        use(pool, 1, [2, 3])
    use(pool, 0, [4, 0])  # expert 4 used once
    use(pool, 1, [5, 2])  # the pool is full: 0, 1, 4 | 2, 3, 5
    pool.begin_layer(0)
    assert pool.choose_victim(0, pinned=[6]) in {(0, 4), (1, 5)}  # used once, not 0-3 used ten times
    # never used at all goes first
    pool2 = make_pool(layers=2, experts=8, slots=4)
    use(pool2, 0, [0, 1])
    pool2.view(1).admit(7, pinned=[7])  # admitted, never touched
    pool2.view(1).admit(6, pinned=[6])
    pool2.begin_layer(0)
    assert pool2.choose_victim(0, pinned=[2])[0] == 1


def rule_as_stated(pool: SharedPool, requester: int, pinned, spare_useful: bool = False):
    """The victim by the docstring's rule, one resident at a time with :meth:`SharedPool.expected_next_use`."""
    best = None
    for view in pool.views:
        if view.ordinal == pool.current and requester != pool.current:
            continue
        for expert in view.resident_keys():
            if expert in view.loading() or (view.ordinal == requester and expert in pinned):
                continue
            if spare_useful and view.useful(expert):
                continue
            key = (pool.expected_next_use(view.ordinal, expert), -view.ordinal, -expert)
            best = key if best is None or key > best else best
    return None if best is None else (-best[1], -best[2])


@pytest.mark.parametrize("loop_max_slots", [0, 1 << 30], ids=["arrays", "loop"])
@pytest.mark.parametrize("layers,experts,slots", [(3, 8, 6), (8, 16, 32), (6, 16, 33), (4, 64, 40)])
def test_both_ways_to_choose_a_victim_follow_the_rule_as_stated(layers, experts, slots, loop_max_slots, monkeypatch):
    """choose_victim goes resident by resident in small pools and scores the whole pool in array operations in
    large ones; on random routing, with loads in flight and pinned experts, each picks exactly what the rule picks
    expert by expert with expected_next_use (ties included)."""
    monkeypatch.setattr(shared_pool, "LOOP_MAX_SLOTS", loop_max_slots)
    rng = random.Random(layers * 1000 + slots)
    pool = make_pool(layers=layers, experts=experts, slots=slots)
    checked = 0
    for step in range(120):
        for ordinal in range(layers):
            skewed = [min(experts - 1, int(rng.expovariate(0.4))) for _ in range(2)]  # a few popular experts
            needed = list(dict.fromkeys(skewed)) if rng.random() < 0.7 else rng.sample(range(experts), 2)
            pool.begin_layer(ordinal)
            other = pool.view(rng.randrange(layers))
            held = set(rng.sample(other.resident_keys(), min(1, len(other.resident_keys()))))
            other.loading = lambda held=held: held
            for requester, spare in ((ordinal, False), ((ordinal + 1) % layers, False), (ordinal, True)):
                if pool.free_slots() == 0:
                    assert pool.choose_victim(requester, needed, spare) == rule_as_stated(pool, requester, needed, spare)
                    checked += 1
            other.loading = tuple
            serve_step(pool.view(ordinal), needed)
    assert checked > 300


def test_config():
    assert OffloadConfig.from_dict({"policy": "lru", "pool": "shared"}).pool is Pool.SHARED
    assert OffloadConfig.from_dict({"policy": "lru"}).pool is Pool.AUTO
    assert OffloadConfig.from_dict({"policy": "lru", "pool": "layer"}).pool is Pool.LAYER
    assert OffloadConfig.from_dict({"policy": "fate", "pool": "shared"}).to_dict()["pool"] == "shared"
    with pytest.raises(OffloadConfigError, match="pool 'bogus' is not one of"):
        OffloadConfig.from_dict({"policy": "lru", "pool": "bogus"})
    with pytest.raises(OffloadConfigError, match="not 'ondemand'"):
        OffloadConfig.from_dict({"policy": "ondemand", "pool": "shared"})


def replay(trace, share: float, shared: bool) -> float:
    """Demand misses per token, one cold cache per sequence, each layer's step pinned (batch-1 decode):
    one shared pool, or LRU per layer, of the same slots."""
    layers, top_k = trace.topk_ids.shape[1], trace.topk_ids.shape[2]
    experts = int(trace.topk_ids.max()) + 1
    per_layer = int(experts * share)
    misses = tokens = 0
    for seq in np.unique(trace.seq_ids):
        rows = np.flatnonzero(trace.seq_ids == seq)
        rows = rows[np.argsort(trace.positions[rows])]
        pool = make_pool(layers, experts, per_layer * layers, top_k)
        maps = [SlotMap(experts, per_layer, LRUPolicy(experts, per_layer)) for _ in range(layers)]
        for row in rows:
            for layer in range(layers):
                needed = [int(e) for e in trace.topk_ids[row, layer]]
                misses += use(pool, layer, needed) if shared else serve_step(maps[layer], needed)
            tokens += 1
    return misses / tokens


@pytest.mark.skipif(not HUMANEVAL.is_file(), reason=f"{HUMANEVAL} is absent (the real traces live in ../shared/traces)")
def test_mixtral_humaneval_prefers_pools_per_layer():
    """Mixtral's experts are used nearly uniformly: frequency says little, and the shared pool's rule misses
    more than LRU per layer (the module docstring's figures; tiny-mixtral's skewed routing is the other way)."""
    trace = load_trace(HUMANEVAL)
    shared, layer = replay(trace, 0.5, shared=True), replay(trace, 0.5, shared=False)
    assert shared == pytest.approx(24.85, abs=0.01) and layer == pytest.approx(24.31, abs=0.01)
