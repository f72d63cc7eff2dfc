"""LFU and the activation-path predictor, on cases small enough to count by hand."""

from __future__ import annotations

import numpy as np
import pytest

from tests.core.tracegen import make_trace, one_layer
from vllm_moe_offload.core.policies_extra import LFUPolicy, make_sim_policy
from vllm_moe_offload.core.predictors import ActivationPathPredictor, OraclePredictor, make_predictor
from vllm_moe_offload.core.simulate import simulate


def test_lfu_evicts_the_least_used_then_the_least_recent():
    lfu = LFUPolicy(num_experts=4, capacity=3)
    for expert in (0, 0, 1, 2, 1):
        lfu.on_access(expert, hit=False)
    assert lfu.choose_victim({0, 1, 2}, pinned=()) == 2
    assert lfu.choose_victim({0, 1}, pinned=()) == 0  # tie at 2 uses: 0 was used longest ago
    assert lfu.choose_victim({0, 1, 3}, pinned={3}) == 0  # pinned never leaves
    assert lfu.choose_victim({0, 1, 3}, pinned=()) == 3  # never used counts 0


def test_lfu_keeps_counts_after_eviction():
    # 2 slots, top-1: 0 0 0 1 2 0 -> 2 evicts 1 (count 1 < 3), 0 stays: hit at the end.
    trace = one_layer([0], [0], [0], [1], [2], [0], num_experts=3)
    lfu = simulate(trace, [2], ["lfu"])["results"][0]["policies"]["lfu"]
    assert (lfu["misses"], lfu["cache_hits"]) == (3, 3)


def test_factory_names():
    assert make_sim_policy("lfu", 8, 2, 2).name == "lfu"
    assert make_sim_policy("belady", 8, 2, 2, [[0, 1]]).name == "belady"
    assert make_sim_policy("ondemand", 8, 4, 2).name == "ondemand"
    with pytest.raises(ValueError, match="allowed"):
        make_sim_policy("mru", 8, 2, 2)
    with pytest.raises(ValueError, match="allowed"):
        make_predictor("fate", 2)


def _eap_after(trace, history, rows_observed: int, layer: int) -> list[int]:
    eap = ActivationPathPredictor(top_n=2, history=history)
    eap.reset(trace)
    for row in range(rows_observed):
        eap.begin_step(row, np.array([row]))
        for lay in range(trace.num_trace_layers):
            eap.observe(row, lay, trace.topk_ids[[row], lay])
    eap.begin_step(rows_observed, np.array([rows_observed]))
    return eap.predict(rows_observed, layer)


def test_eap_follows_the_closest_past_request():
    # History: request A used experts 0 and 1 at both layers, B used 2 and 3 at layer 0 and 4, 5 at layer 1.
    a = np.zeros((2, 6))
    a[:, [0, 1]] = 1
    b = np.zeros((2, 6))
    b[0, [2, 3]] = 1
    b[1, [4, 5]] = 1
    trace = make_trace([[[2], [4]], [[3], [5]]], num_experts=6)
    assert _eap_after(trace, [a, b], rows_observed=1, layer=1) == [4, 5]
    # Before anything is observed the history's sum ranks experts (ties by id).
    assert _eap_after(trace, [a, b], rows_observed=0, layer=0) == [0, 1]


def test_eap_without_history_uses_the_request_itself():
    trace = make_trace([[[3]], [[3]], [[1]]], num_experts=6)
    assert _eap_after(trace, [], rows_observed=0, layer=0) == []
    assert _eap_after(trace, [], rows_observed=2, layer=0) == [3]


def test_eap_learns_from_finished_requests():
    # Sequence 1 repeats sequence 0's routing: once 0 finished, EAP predicts 1's needs.
    trace = make_trace([[[0, 1]], [[2, 3]], [[0, 1]], [[2, 3]]], num_experts=6, seq_ids=[0, 0, 1, 1])
    eap = simulate(trace, [2], ["eap"])["results"][0]["policies"]["lru+eap"]
    assert eap["predicted"] > 0 and 0 < eap["precision"] <= 1 and 0 < eap["recall"] <= 1


def test_oracle_cuts_to_top_n_in_token_then_gate_order():
    trace = make_trace([[[1, 2]], [[2, 0]]], num_experts=4, step_ids=[0, 0])
    oracle = OraclePredictor(top_n=2)
    oracle.reset(trace)
    oracle.begin_step(0, np.array([0, 1]))
    assert oracle.predict(0, 0) == [1, 2]
