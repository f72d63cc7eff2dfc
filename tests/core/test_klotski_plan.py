"""Klotski's planner: the overlap inequalities' edge cases and the bounds on n and K."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_moe_offload.core.klotski_plan import (
    KlotskiCosts,
    KlotskiLimits,
    plan_klotski,
    uniform_distinct_experts,
)

MIXTRAL = {"num_experts": 8, "top_k": 2}


def _limits(**kw) -> KlotskiLimits:
    return KlotskiLimits(**{**MIXTRAL, "slots": 8, "kv_max_seqs": 10_000, **kw})


def test_negligible_loading_needs_no_grouping():
    costs = KlotskiCosts(attn_ms_per_token=0.1, expert_ms_per_token=0.05, expert_load_ms=0.0)
    plan = plan_klotski(costs, _limits(), batch_size=4)
    assert (plan.group_size, plan.prefetch_depth, plan.limiter) == (1, 1, "overlap")
    assert plan.overlapped and plan.bubble_ms == 0.0
    # 4 tokens need ~5.5 of 8 experts (uniform routing): K stops at 5, below the 7 the slots allow.
    assert plan.distinct_experts == pytest.approx(8 * (1 - 0.75**4))
    assert plan.hot_experts == 5 == math.floor(plan.distinct_experts)


def test_dominant_loading_grows_n_to_the_smallest_that_overlaps():
    # Paper-like: 21 ms per expert, 2.6 ms attention for a batch of 16, < 1 ms per expert per token.
    costs = KlotskiCosts(attn_ms_per_token=2.6 / 16, expert_ms_per_token=0.05, expert_ms_fixed=0.5,
                         expert_load_ms=21.0)
    plan = plan_klotski(costs, _limits(max_group=64), batch_size=16)
    assert plan.overlapped and plan.limiter == "overlap" and plan.group_size > 1
    assert all(s >= 0 for s in plan.slack_ms)
    smaller = plan_klotski(costs, _limits(max_group=plan.group_size - 1), batch_size=16)
    assert not smaller.overlapped and smaller.limiter == "max_group"
    assert smaller.group_size == plan.group_size - 1


def test_loading_beyond_every_bound_stops_at_the_bound_with_a_deeper_prefetch():
    costs = KlotskiCosts(attn_ms_per_token=0.01, expert_ms_per_token=0.01, expert_load_ms=50.0)
    plan = plan_klotski(costs, _limits(max_group=4, max_depth=3), batch_size=2)
    assert (plan.group_size, plan.limiter) == (4, "max_group")
    assert not plan.overlapped and plan.bubble_ms > 0
    assert plan.prefetch_depth == 3  # hot loads do not fit one attention window: fetched 3 layers ahead
    assert "bubble" in plan.describe() and "limited by max_group" in plan.describe()


def test_budget_caps_the_hot_experts():
    costs = KlotskiCosts(attn_ms_per_token=1.0, expert_ms_per_token=0.1, expert_load_ms=0.001)
    assert plan_klotski(costs, _limits(slots=3), batch_size=32).hot_experts == 2  # one slot left for cold loads
    assert plan_klotski(costs, _limits(slots=3, reserve_slots=0), batch_size=32).hot_experts == 3
    assert plan_klotski(costs, _limits(slots=8), batch_size=32).hot_experts == 7


def test_batch_one_prefetches_top_k_at_most():
    costs = KlotskiCosts(attn_ms_per_token=1.0, expert_ms_per_token=0.1, expert_load_ms=0.001)
    plan = plan_klotski(costs, _limits(), batch_size=1)
    assert plan.hot_experts == 2 and plan.distinct_experts == 2.0 and plan.cold_experts == 0


def test_kv_headroom_caps_the_group():
    costs = KlotskiCosts(attn_ms_per_token=0.01, expert_ms_per_token=0.01, expert_load_ms=50.0)
    plan = plan_klotski(costs, _limits(kv_max_seqs=24), batch_size=8)
    assert (plan.group_size, plan.limiter) == (3, "kv")
    assert plan_klotski(costs, _limits(kv_max_seqs=5), batch_size=8).group_size == 1  # never below one batch


def test_measured_distinct_experts_replace_the_uniform_estimate():
    costs = KlotskiCosts(attn_ms_per_token=1.0, expert_ms_per_token=0.1, expert_load_ms=0.001)
    plan = plan_klotski(costs, _limits(), batch_size=32, distinct_experts=lambda tokens: 3.0)
    assert plan.distinct_experts == 3.0 and plan.hot_experts == 3
    assert uniform_distinct_experts(1, 8, 2) == pytest.approx(2.0)
    assert uniform_distinct_experts(10_000, 8, 2) == pytest.approx(8.0)


def test_bad_inputs_are_refused():
    costs = KlotskiCosts(attn_ms_per_token=1.0, expert_ms_per_token=0.1, expert_load_ms=1.0)
    with pytest.raises(ValueError, match="batch_size"):
        plan_klotski(costs, _limits(), batch_size=0)
    with pytest.raises(ValueError, match="expert_load_ms"):
        KlotskiCosts(attn_ms_per_token=1.0, expert_ms_per_token=0.1, expert_load_ms=-1.0)
    with pytest.raises(ValueError, match="hot_precision"):
        KlotskiCosts(attn_ms_per_token=1.0, expert_ms_per_token=0.1, expert_load_ms=1.0, hot_precision=2.0)
    with pytest.raises(ValueError, match="slots"):
        _limits(slots=1)
    with pytest.raises(ValueError, match="kv_max_seqs"):
        _limits(kv_max_seqs=0)


ms = st.floats(0.0, 50.0, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(ms, ms, ms, ms, ms, st.integers(1, 64), st.integers(2, 64), st.integers(1, 200), st.integers(1, 20),
       st.integers(1, 4))
def test_plan_invariants(attn, attn_fixed, expert, expert_fixed, load, num_experts, slots, batch, max_group, depth):
    top_k = min(2, num_experts)
    limits = KlotskiLimits(num_experts=num_experts, top_k=top_k, slots=max(slots, top_k), kv_max_seqs=400,
                           max_group=max_group, max_depth=depth)
    costs = KlotskiCosts(attn_ms_per_token=attn, attn_ms_fixed=attn_fixed, expert_ms_per_token=expert,
                         expert_ms_fixed=expert_fixed, expert_load_ms=load)
    plan = plan_klotski(costs, limits, batch)
    assert 1 <= plan.group_size <= min(max_group, max(1, 400 // batch))
    assert 0 <= plan.hot_experts <= min(num_experts, max(0, limits.slots - 1))
    assert 1 <= plan.prefetch_depth <= depth
    assert top_k <= plan.distinct_experts <= num_experts
    assert plan.overlapped == (plan.limiter == "overlap")
    assert plan.overlapped or plan.bubble_ms > 0
    if load == 0.0:  # free loads always overlap at once
        assert plan.group_size == 1 and plan.overlapped
    if plan.limiter == "overlap" and plan.group_size > 1:
        assert not plan_klotski(costs, KlotskiLimits(**{**vars(limits), "max_group": plan.group_size - 1}),
                                batch).overlapped
