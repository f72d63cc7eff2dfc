"""The frequency policies (core/frequency.py): each scoring rule by hand, and the laws every cache obeys."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.core.tracegen import one_layer
from vllm_moe_offload.core.belady import belady_misses
from vllm_moe_offload.core.cache import SlotMap
from vllm_moe_offload.core.replacement import FREQUENCY_POLICY_NAMES, make_policy
from vllm_moe_offload.core.frequency import (
    FREQUENCY_POLICIES,
    DecayPolicy,
    EWMAPolicy,
    LFRUPolicy,
    Log2DecayPolicy,
    ScoredPolicy,
)
from vllm_moe_offload.core.policies_extra import SIM_POLICY_NAMES, make_sim_policy
from vllm_moe_offload.core.simulate import ALL_POLICIES, simulate


def run_steps(policy: ScoredPolicy, steps: list[list[int]]) -> None:
    """Tell ``policy`` that step ``i`` accessed ``steps[i]`` (in order), ending each step."""
    for accessed in steps:
        for expert in accessed:
            policy.on_access(expert, hit=True)
        policy.on_step_end()


def test_names_match_the_registry():
    assert tuple(FREQUENCY_POLICIES) == FREQUENCY_POLICY_NAMES
    for name in FREQUENCY_POLICY_NAMES:
        assert make_policy(name, 8, 4, top_k=2).name == name
        assert make_sim_policy(name, 8, 4, 2).name == name
        assert name in SIM_POLICY_NAMES


def test_lfru_divides_uses_by_steps_since_the_last():
    lfru = LFRUPolicy(num_experts=4, capacity=2)
    run_steps(lfru, [[0], [0], [], [], [1]])  # now step 5: 0 scores 2 / (5-1+1), 1 scores 1 / (5-4+1)
    assert lfru.choose_victim({0, 1}, pinned=()) == 0  # LRU would agree, LFU would not
    run_steps(lfru, [[0], [0]])  # step 7: 0 has 4 uses, last at 6 -> 2.0; 1 -> 1/4
    assert lfru.choose_victim({0, 1}, pinned=()) == 1


def test_lfru_forgets_the_count_on_eviction():
    lfru = LFRUPolicy(num_experts=4, capacity=2)
    run_steps(lfru, [[0, 0, 0, 0], [1, 1]])
    lfru.on_evict(0)
    run_steps(lfru, [[0]])  # step 3: 0 back with 1 use scores 1/2, 1 scores 2/3 (with its 4 old uses 0 would stay)
    assert lfru.choose_victim({0, 1}, pinned=()) == 0


def test_log2decay_compares_classes_then_recency():
    policy = Log2DecayPolicy(num_experts=4, capacity=3)
    run_steps(policy, [[0] * 7, [1] * 5, [2] * 9])  # counts 6.9, 4.9, 9.0 at step 3: classes 2, 2, 3
    assert policy.choose_victim({0, 1, 2}, pinned=()) == 0  # more uses than 1, same class, older
    assert policy.choose_victim({1, 2}, pinned=()) == 1  # class 2 < class 3
    assert policy.choose_victim({1, 2}, pinned={1}) == 2


@pytest.mark.parametrize(("gap", "victim"), [(100, 1), (200, 0)])
def test_log2decay_halves_every_128_steps(gap, victim):
    # 8 uses at step 0 against 3 at step gap - 1: after 100 steps 4.6 (class 2) beats 3 (class 1);
    # after 200 steps 2.7 shares 3's class and is older. Half-lives of 64 or 256 would swap one of them.
    policy = Log2DecayPolicy(num_experts=4, capacity=2)
    run_steps(policy, [[0] * 8] + [[]] * (gap - 2) + [[1] * 3])
    assert policy.choose_victim({0, 1}, pinned=()) == victim


def test_ewma_counts_a_step_once():
    # Expert 0 is used twice in step 0 (two passes), 1 once: the same mean, so the older access leaves.
    ewma = EWMAPolicy(num_experts=4, capacity=2)
    run_steps(ewma, [[0, 0, 1]])
    assert ewma.choose_victim({0, 1}, pinned=()) == 0
    decay = DecayPolicy(num_experts=4, capacity=2)
    run_steps(decay, [[0, 0, 1]])
    assert decay.choose_victim({0, 1}, pinned=()) == 1  # decay counts accesses: 2 against 1


@pytest.mark.parametrize(("gap", "victim"), [(14, 1), (15, 0)])
def test_ewma_forgets_at_rate_alpha(gap, victim):
    # 0 used at steps 0 and 1, 1 at step `gap`. With alpha 0.05 one use at step k outweighs the
    # two iff 0.95**-(k - 1) > 1.95, i.e. k >= 15.
    assert EWMAPolicy.alpha == 0.05
    ewma = EWMAPolicy(num_experts=4, capacity=2)
    run_steps(ewma, [[0], [0]] + [[]] * (gap - 2) + [[1]])
    assert ewma.choose_victim({0, 1}, pinned=()) == victim


@pytest.mark.parametrize(("step", "victim"), [(31, 1), (33, 0)])
def test_decay_halves_every_32_steps(step, victim):
    # Two uses at step 0 outweigh one use at step s until s = 32 (2 * 0.5**(s/32) > 1).
    decay = DecayPolicy(num_experts=4, capacity=2)
    run_steps(decay, [[0, 0]] + [[]] * (step - 1) + [[1]])
    assert decay.choose_victim({0, 1}, pinned=()) == victim


@pytest.mark.parametrize("policy_cls", [Log2DecayPolicy, EWMAPolicy, DecayPolicy])
def test_history_survives_eviction(policy_cls):
    policy = policy_cls(num_experts=4, capacity=2)
    run_steps(policy, [[0]] * 10 + [[1]])
    policy.on_evict(0)
    run_steps(policy, [[0], [2]])  # 0 re-enters with its ten uses; without them it would be 2's older equal
    assert policy.choose_victim({0, 2}, pinned=()) == 2


@pytest.mark.parametrize("name", FREQUENCY_POLICY_NAMES)
def test_never_accessed_experts_leave_first(name):
    policy = make_policy(name, 4, 3, top_k=1)
    run_steps(policy, [[3], [1]])
    assert policy.choose_victim({0, 1, 2, 3}, pinned=()) == 0  # warm-loaded, never used: lowest id first
    assert policy.choose_victim({1, 3}, pinned=()) == 3


@st.composite
def access_lists(draw):
    """Passes of distinct experts (one pass per step), a capacity that fits every pass."""
    num_experts = draw(st.integers(2, 7))
    capacity = draw(st.integers(1, num_experts))
    width = st.integers(1, capacity)
    passes = draw(st.lists(width.flatmap(
        lambda w: st.lists(st.integers(0, num_experts - 1), min_size=w, max_size=w, unique=True)
    ), max_size=40))
    return passes, num_experts, capacity


def replay_misses(name: str, passes: list[list[int]], num_experts: int, capacity: int, pin_pass: bool) -> int:
    """Demand-cache ``passes``; checks capacity and pinning at every admission; returns the misses.

    ``pin_pass``: the whole pass is pinned (one fused kernel); else only the experts served so far
    (the simulator's sequential order).
    """
    slots = SlotMap(num_experts, capacity, make_sim_policy(name, num_experts, capacity, 1))
    misses = 0
    for needed in passes:
        served: set[int] = set()
        for expert in needed:
            pinned = set(needed) if pin_pass else set(served)
            hit = slots.slot_of(expert) is not None
            if not hit:
                evicted = slots.admit(expert, pinned).evicted
                assert evicted not in pinned
                misses += 1
            slots.touch(expert, hit=hit)
            served.add(expert)
            assert len(slots) <= capacity
            assert all(slots.slot_of(e) is not None for e in served)
        slots.end_step()
    return misses


@settings(max_examples=150, deadline=None)
@given(access_lists(), st.sampled_from(FREQUENCY_POLICY_NAMES), st.booleans())
def test_capacity_pinning_and_belady_bound(case, name, pin_pass):
    passes, num_experts, capacity = case
    misses = replay_misses(name, passes, num_experts, capacity, pin_pass)
    assert misses >= belady_misses(passes, num_experts, capacity)


def test_all_runs_every_policy():
    trace = one_layer([0, 1], [2, 3], [1, 2], [0, 3], num_experts=4)
    report = simulate(trace, [2], ["all"])
    assert report["policies"] == list(ALL_POLICIES)
    assert set(SIM_POLICY_NAMES) <= set(report["results"][0]["policies"])
