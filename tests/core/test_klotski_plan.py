"""Klotski's planner: the overlap inequalities' edge cases, the bounds on n, K and the depth, the cost
fit (warm-up left out, decode steps priced as decode steps) and the prediction chained over layers."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import numpy as np

from vllm_moe_offload.core.correlation import CorrelationTable
from vllm_moe_offload.core.traces import load_trace
from vllm_moe_offload.core.klotski_plan import (
    KlotskiCosts,
    KlotskiLimits,
    StepCostFit,
    hot_ahead,
    measured_costs,
    plan_klotski,
    tendencies_ahead,
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
       st.integers(1, 4), st.none() | st.integers(0, 64))
def test_plan_invariants(attn, attn_fixed, expert, expert_fixed, load, num_experts, slots, batch, max_group, depth,
                         spare):
    top_k = min(2, num_experts)
    limits = KlotskiLimits(num_experts=num_experts, top_k=top_k, slots=max(slots, top_k), kv_max_seqs=400,
                           max_group=max_group, max_depth=depth, spare_slots=spare)
    costs = KlotskiCosts(attn_ms_per_token=attn, attn_ms_fixed=attn_fixed, expert_ms_per_token=expert,
                         expert_ms_fixed=expert_fixed, expert_load_ms=load)
    plan = plan_klotski(costs, limits, batch)
    assert 1 <= plan.group_size <= min(max_group, max(1, 400 // batch))
    assert 0 <= plan.hot_experts <= min(num_experts, max(0, limits.slots - 1))
    assert 1 <= plan.prefetch_depth <= depth
    if spare == 0:  # no hot load is issued: nothing to fetch farther ahead
        assert plan.prefetch_depth == 1
    assert top_k <= plan.distinct_experts <= num_experts
    assert plan.overlapped == (plan.limiter == "overlap")
    assert plan.overlapped or plan.bubble_ms > 0
    if load == 0.0:  # free loads always overlap at once
        assert plan.group_size == 1 and plan.overlapped
    if plan.limiter == "overlap" and plan.group_size > 1:
        assert not plan_klotski(costs, KlotskiLimits(**{**vars(limits), "max_group": plan.group_size - 1}),
                                batch).overlapped


# --- the cost fit -------------------------------------------------------------------------------


def test_fit_leaves_out_the_warm_up_and_recovers_a_line():
    fit = StepCostFit(decay=1.0, warmup_steps=2)
    fit.add(512, 900.0)  # start-up: buffers allocated, kernels chosen
    fit.add(512, 400.0)
    assert not fit.ready and fit.predict(32) == 0.0
    for tokens in (512, 32, 512, 32, 256):
        fit.add(tokens, 2.0 + 0.25 * tokens)  # 2 ms per layer plus 0.25 ms per token
    fixed, per_token = fit.coefficients()
    assert fixed == pytest.approx(2.0) and per_token == pytest.approx(0.25)
    assert fit.predict(32) == pytest.approx(10.0) and fit.samples == 5 and fit.skipped == 2


def test_one_step_size_gives_the_time_per_token_of_that_size():
    fit = StepCostFit(warmup_steps=0)
    for _ in range(10):
        fit.add(32, 8.0)
    assert fit.coefficients() == (0.0, pytest.approx(0.25))
    assert fit.predict(32) == pytest.approx(8.0)


def test_old_prefill_steps_fade_and_noise_never_gives_negative_costs():
    fit = StepCostFit(decay=0.5, warmup_steps=0)
    fit.add(512, 156.0)
    for _ in range(40):
        fit.add(32, 8.0)
    assert fit.predict(32) == pytest.approx(8.0, rel=1e-6)
    falling = StepCostFit(decay=1.0, warmup_steps=0)
    falling.add(10, 5.0)
    falling.add(100, 4.0)  # bigger steps faster: noise, not a cost model
    assert falling.coefficients() == (pytest.approx(4.5), 0.0)
    steep = StepCostFit(decay=1.0, warmup_steps=0)
    steep.add(10, 1.0)
    steep.add(100, 30.0)  # the line would cross zero above 0 tokens: through the origin instead
    fixed, per_token = steep.coefficients()
    assert fixed == 0.0 and per_token > 0
    with pytest.raises(ValueError):
        steep.add(0, 1.0)
    with pytest.raises(ValueError):
        steep.add(4, float("nan"))


def test_decode_steps_are_priced_as_decode_steps_not_by_the_prefills_before_them():
    # Session 3: a smoothed kernel time over prefill and warm-up steps divided by a decode
    # step's 32 tokens read "compute 156 ms vs I/O 145 ms per layer": overlapped. Here prefills
    # of 512 tokens cost 156 ms per layer, decode steps of 32 tokens 10 ms; the link needs 145 ms.
    between, moe = StepCostFit(), StepCostFit()
    for tokens, moe_ms in [(512, 900.0), (512, 500.0)] + [(512, 156.0)] * 3 + [(32, 10.0)] * 10:
        moe.add(tokens, moe_ms)
        between.add(tokens, moe_ms / 10)
    assert moe.predict(32) == pytest.approx(10.0, rel=1e-6)
    costs = measured_costs(between, moe, top_k=2, expert_load_ms=145.0 / 12)
    limits = KlotskiLimits(num_experts=16, top_k=2, slots=4, kv_max_seqs=64, max_group=1, reserve_slots=0)
    decode = plan_klotski(costs, limits, batch_size=32)
    assert not decode.overlapped and decode.compute_ms == pytest.approx(11.0, rel=1e-3)
    assert decode.io_ms == pytest.approx(145.0 / 12 * uniform_distinct_experts(32, 16, 2))  # ~15.8 experts
    assert "bubble" in decode.describe()


def test_measured_costs_map_the_lines_onto_the_paper_terms():
    between, moe = StepCostFit(decay=1.0, warmup_steps=0), StepCostFit(decay=1.0, warmup_steps=0)
    for tokens in (8, 64):
        between.add(tokens, 1.0 + 0.5 * tokens)
        moe.add(tokens, 3.0 + 0.2 * tokens)
    costs = measured_costs(between, moe, top_k=2, expert_load_ms=7.0)
    assert costs.attn_ms_fixed == pytest.approx(1.0) and costs.attn_ms_per_token == pytest.approx(0.5)
    assert costs.moe_ms_fixed == pytest.approx(3.0) and costs.expert_ms_per_token == pytest.approx(0.1)
    plan = plan_klotski(costs, _limits(max_group=1), batch_size=16)
    assert plan.compute_ms == pytest.approx(1.0 + 0.5 * 16 + 3.0 + 0.2 * 16)


# --- the prefetch depth -------------------------------------------------------------------------


def test_depth_follows_the_loads_over_the_attention_window():
    # 1 ms between MoE layers, 3 ms per load, 4 hot experts: they need 12 ms, 12 windows
    costs = KlotskiCosts(attn_ms_per_token=0.0, attn_ms_fixed=1.0, expert_ms_per_token=0.01, expert_load_ms=3.0)
    shallow = dict(num_experts=8, top_k=2, slots=4, kv_max_seqs=1, max_group=1, reserve_slots=0)
    assert plan_klotski(costs, KlotskiLimits(**shallow, max_depth=1), batch_size=4).prefetch_depth == 1
    deep = plan_klotski(costs, KlotskiLimits(**shallow, max_depth=3), batch_size=4)
    assert deep.prefetch_depth == 3 and "depth 3" in deep.describe()
    # two hot loads need 6 ms: 6 windows of 1 ms, so the cap; windows of 4 ms: 2 are enough
    wide = KlotskiCosts(attn_ms_per_token=0.0, attn_ms_fixed=4.0, expert_ms_per_token=0.01, expert_load_ms=3.0)
    assert plan_klotski(wide, KlotskiLimits(**shallow, max_depth=3, spare_slots=2), batch_size=4).prefetch_depth == 2


def test_depth_stays_one_when_no_slot_can_take_a_prefetch_without_evicting_useful_experts():
    costs = KlotskiCosts(attn_ms_per_token=0.0, attn_ms_fixed=1.0, expert_ms_per_token=0.01, expert_load_ms=3.0)
    limits = KlotskiLimits(num_experts=8, top_k=2, slots=4, kv_max_seqs=1, max_group=1, max_depth=3,
                           reserve_slots=0, spare_slots=0)
    plan = plan_klotski(costs, limits, batch_size=4)
    assert plan.prefetch_depth == 1 and plan.hot_experts == 4  # the prediction is still made, and scored
    assert plan.slack_ms[1] == pytest.approx(1.0)  # no hot load issued: eq. 5 holds
    with pytest.raises(ValueError, match="spare_slots"):
        KlotskiLimits(num_experts=8, top_k=2, slots=4, kv_max_seqs=1, spare_slots=-1)


# --- the prediction chained over layers ---------------------------------------------------------


def _chain_table() -> CorrelationTable:
    """3 layers of 4 experts, top-1: 0 -> 1 -> 2 and 3 -> 3 -> 0, always."""
    table = CorrelationTable(3, 4, 1)
    table.observe_tokens(np.array([[[0], [1], [2]]] * 6 + [[[3], [3], [0]]] * 2))
    return table


def test_chained_tendencies_follow_the_chain_of_layers():
    table = _chain_table()
    ids = np.array([[0], [0], [3]])  # the step's tokens at layer 0
    assert tendencies_ahead(table, 1, ids, 1).tolist() == table.tendencies(1, ids).tolist() == [0, 2, 0, 1]
    assert tendencies_ahead(table, 1, ids, 2).tolist() == pytest.approx([1, 0, 2, 0])  # layer 2
    assert hot_ahead(table, 1, ids, 2, 1) == [2] and hot_ahead(table, 1, ids, 2, 4) == [2, 0]
    assert hot_ahead(table, 1, ids, 1, 2) == table.hot(1, ids, 2) == [1, 3]
    with pytest.raises(ValueError, match="cannot look"):
        tendencies_ahead(table, 1, ids, 3)  # no layer 3


def test_chained_tendencies_use_the_marginal_for_unseen_experts():
    table = _chain_table()
    ids = np.array([[2]])  # expert 2 was never chosen at layer 0: layer 1's marginal, then the chain
    scores = tendencies_ahead(table, 1, ids, 2)
    assert scores.sum() == pytest.approx(1.0)  # one token's routing, carried over two layers
    assert scores.tolist() == pytest.approx([0.25, 0, 0.75, 0])
    assert hot_ahead(CorrelationTable(3, 4, 1), 1, ids, 2, 2) == []  # nothing counted: no guess


def test_no_issued_load_needs_no_depth_even_without_any_window():
    costs = KlotskiCosts(attn_ms_per_token=0.0, expert_ms_per_token=0.0, expert_load_ms=3.0)
    limits = KlotskiLimits(num_experts=8, top_k=2, slots=4, kv_max_seqs=1, max_depth=3, spare_slots=0)
    assert plan_klotski(costs, limits, batch_size=4).prefetch_depth == 1


SHARED_TRACES = Path(__file__).resolve().parents[2].parent / "shared" / "traces"


def _chained_precision(trace, max_distance: int = 3) -> dict[int, tuple[float, float]]:
    """Batch-1 decode, online (the table counts each token after predicting it): per distance d, the
    share of the top_k experts predicted for layer l + d that the token then used, chained from its
    experts at layer l, and the same for the most frequent experts of layer l + d (no correlation)."""
    _, num_layers, k = trace.topk_ids.shape
    table = CorrelationTable(num_layers, trace.meta.num_experts, k)
    right = {d: [0, 0, 0] for d in range(1, max_distance + 1)}  # chained right, frequent right, predicted
    for row in np.lexsort((trace.positions, trace.seq_ids)):
        ids = trace.topk_ids[row].astype(np.int64)  # [L, k]
        for layer in range(num_layers - 1) if table.tokens_seen else ():
            for d in range(1, min(max_distance, num_layers - 1 - layer) + 1):
                used = set(ids[layer + d].tolist())
                right[d][0] += len(used & set(hot_ahead(table, layer + 1, ids[layer][None, :], d, k)))
                right[d][1] += len(used & set(table.hot(layer + d, None, k)))
                right[d][2] += k
        table.observe_tokens(ids[None])
    return {d: (chained / n, frequent / n) for d, (chained, frequent, n) in right.items()}


def test_chained_prediction_on_real_mixtral_routing_beats_frequency_and_fades_with_distance():
    path = SHARED_TRACES / "mixtral-8x7b-humaneval-decode.jsonl"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    precision = _chained_precision(load_trace(path))
    print("Mixtral-8x7B humaneval decode, hot_ahead precision by distance (chained, frequency only):", precision)
    # measured: 0.412 / 0.325 at distance 1, 0.357 / 0.326 at 2, 0.335 / 0.327 at 3 (random: 0.25)
    assert precision[1][0] == pytest.approx(0.412, abs=0.002) and precision[2][0] == pytest.approx(0.357, abs=0.002)
    assert all(chained > frequent for chained, frequent in precision.values())
    assert precision[1][0] > precision[2][0] > precision[3][0]
