"""Belady's MIN with step-wise set accesses: hand-computed cases and a brute-force check."""

from __future__ import annotations

from functools import lru_cache

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.core.tracegen import one_layer
from vllm_moe_offload.core.belady import belady_misses
from vllm_moe_offload.core.simulate import simulate

# Capacity 2 of 4 experts, one expert per pass:
#   p0 [0, 1]: 0 and 1 miss                          -> {0, 1}
#   p1 [2]:    2 misses; next uses 0@p2, 1@p3: drop 1 -> {0, 2}
#   p2 [0]:    hit
#   p3 [1]:    1 misses; next uses 0@p4, 2@p5: drop 2 -> {0, 1}
#   p4 [0]:    hit
#   p5 [2]:    2 misses; 0 and 1 never return        -> 5 misses, 2 hits of 7 needs.
HAND = [[0, 1], [2], [0], [1], [0], [2]]


def test_hand_example():
    assert belady_misses(HAND, num_experts=4, capacity=2) == 5


def test_hand_example_through_the_simulator():
    # Same needs as one token per step, top-1, in one sequence (the pair [0, 1] as two tokens).
    trace = one_layer([0], [1], [2], [0], [1], [0], [2], num_experts=4)
    belady = simulate(trace, [2], ["belady"])["results"][0]["policies"]["belady"]
    assert (belady["misses"], belady["cache_hits"], belady["needed"]) == (5, 2, 7)


def test_the_step_pins_its_experts():
    # [0], [1, 2], [0] with 2 slots: pass 1 needs 1 and 2 at once, so 0 must leave and
    # come back: 4 misses. (Serving expert by expert and dropping 1 after use would give 3.)
    assert belady_misses([[0], [1, 2], [0]], num_experts=3, capacity=2) == 4


def brute_force_misses(accesses: list[list[int]], capacity: int) -> int:
    """Fewest misses over every eviction choice (demand paging, the step's experts pinned)."""

    @lru_cache(maxsize=None)
    def best(p: int, j: int, resident: frozenset[int]) -> int:
        if p == len(accesses):
            return 0
        if j == len(accesses[p]):
            return best(p + 1, 0, resident)
        expert = accesses[p][j]
        if expert in resident:
            return best(p, j + 1, resident)
        if len(resident) < capacity:
            return 1 + best(p, j + 1, resident | {expert})
        victims = resident - set(accesses[p])
        return 1 + min(best(p, j + 1, resident - {v} | {expert}) for v in victims)

    return best(0, 0, frozenset())


@st.composite
def access_lists(draw):
    num_experts = draw(st.integers(2, 6))
    capacity = draw(st.integers(1, num_experts))
    width = st.integers(1, capacity)
    passes = draw(st.lists(width.flatmap(
        lambda w: st.lists(st.integers(0, num_experts - 1), min_size=w, max_size=w, unique=True)
    ), max_size=10))
    return passes, num_experts, capacity


@settings(max_examples=300, deadline=None)
@given(access_lists())
def test_belady_is_optimal(case):
    passes, num_experts, capacity = case
    assert belady_misses(passes, num_experts, capacity) == brute_force_misses(passes, capacity)
