"""Fate's resident-layer rule: the count of leading resident layers with the fewest expected loads per token."""

import numpy as np
import pytest

from tests.core.tracegen import make_trace
from vllm_moe_offload.core.config import Budget
from vllm_moe_offload.core.correlation import build_profile_from_trace
from vllm_moe_offload.core.plan import plan_slots
from vllm_moe_offload.core.policies_extra import make_sim_policy
from vllm_moe_offload.core.resident import choose_resident_layers, layer_demand, lru_misses_per_token
from vllm_moe_offload.core.schedule import build_schedules
from vllm_moe_offload.core.simulate import replay

L, E, K = 4, 8, 2


def test_misses_of_uniform_demand_are_exact_and_fall_with_slots():
    uniform = [K / E] * E
    # uniform demand: Che's approximation is exact, a token misses k * (1 - s / E)
    for slots in range(E + 1):
        assert lru_misses_per_token(uniform, slots) == pytest.approx(K * (1 - slots / E), abs=1e-9)
    skewed = layer_demand(np.array([[40, 30, 10, 10, 5, 3, 2, 0]]), K)[0]
    assert skewed.sum() == pytest.approx(K)
    misses = [lru_misses_per_token(skewed, s) for s in range(E + 1)]
    assert all(a > b for a, b in zip(misses[:6], misses[1:7]))
    assert misses[7] == 0.0  # every expert ever needed fits


#: a skewed layer: expert e is drawn with weight 1 / (e + 1) (a few experts serve most tokens)
SKEWED = "skewed"


def _trace(layer_choices, num_tokens=400, seed=0):
    """Tokens whose top-2 at each layer come from that layer's candidates (uniformly, or SKEWED); 4 sequences."""
    rng = np.random.default_rng(seed)
    zipf = 1.0 / np.arange(1, E + 1)

    def pick(cands):
        if cands == SKEWED:
            return rng.choice(E, K, replace=False, p=zipf / zipf.sum())
        return rng.choice(list(cands), K, replace=False)

    rows = [[sorted(pick(cands).tolist()) for cands in layer_choices] for _ in range(num_tokens)]
    return make_trace(rows, E, seq_ids=[t % 4 for t in range(num_tokens)])


def _split(budget_slots, min_rest=None):
    return lambda r: plan_slots(Budget(num_bytes=budget_slots), L, E, K, 1, resident_layers=r,
                                min_rest_slots=min_rest).layer_slots


def _simulated_loads(trace, layer_slots):
    schedules = build_schedules(trace, "per-sequence", list(layer_slots))
    counts = replay(trace, schedules, list(layer_slots),
                    lambda layer, acc: make_sim_policy("lru", E, layer_slots[layer], K, acc), order="step")
    return sum(c.loads for c in counts)


@pytest.mark.parametrize("layer_choices, expected", [
    # layer 1 spreads over every expert, the deeper layers reuse two: keeping layer 1 whole costs them nothing
    ([SKEWED, range(E), [0, 1], [2, 3]], 2),
    # every layer has a few busy experts: a slot spent on a resident layer's rare ones is worth less elsewhere
    ([SKEWED] * L, 1),
])
def test_the_rule_picks_the_count_with_fewest_simulated_loads(layer_choices, expected):
    trace = _trace(layer_choices)
    demand = layer_demand(build_profile_from_trace(trace).counts, K)
    split = _split(20)  # 20 of 32 slots: 1 or 2 resident layers fit (4 or 2 slots for the others), 3 do not
    choice = choose_resident_layers(demand, split)
    assert set(choice.loads_by_count) == {1, 2}
    simulated = {r: _simulated_loads(trace, split(r)) for r in choice.loads_by_count}
    assert choice.resident_layers == min(simulated, key=simulated.get) == expected, (choice, simulated)


def test_the_rule_stays_within_what_the_budget_allows():
    trace = _trace([SKEWED, range(E), [0, 1], [2, 3]])
    demand = layer_demand(build_profile_from_trace(trace).counts, K)
    # each offloaded layer must keep 4 slots: 2 resident layers would leave 3
    choice = choose_resident_layers(demand, _split(22, min_rest=4))
    assert choice.resident_layers == 1 and set(choice.loads_by_count) == {1}
    # 16 of 32 slots with 4 per offloaded layer: not even layer 0 can be whole, the plan's even split stands
    choice = choose_resident_layers(demand, _split(16, min_rest=4))
    assert choice.resident_layers == 0 and set(choice.loads_by_count) == {0}


def test_recall_counts_only_for_the_share_of_a_load_that_compute_hides():
    trace = _trace([SKEWED] * L)
    demand = layer_demand(build_profile_from_trace(trace).counts, K)
    recall = [None, 0.0, 1.0, 1.0]  # layer 1 predicts nothing, the deeper ones everything
    assert choose_resident_layers(demand, _split(20), recall, hidden=0.0).resident_layers == 1  # slow link
    assert choose_resident_layers(demand, _split(20), recall, hidden=1.0).resident_layers == 2  # loads fully hidden


def test_layer_zero_resident_is_the_floor_unless_asked_otherwise():
    trace = _trace([SKEWED] * L)
    demand = layer_demand(build_profile_from_trace(trace).counts, K)
    choice = choose_resident_layers(demand, _split(20), min_resident=0)
    assert set(choice.loads_by_count) == {0, 1, 2} and choice.resident_layers == 0  # even split loads least here
    assert choose_resident_layers(demand, _split(20)).resident_layers == 1


def test_extra_slots_go_first_to_the_layers_they_save_most_misses():
    from vllm_moe_offload.core.resident import extra_slot_order, layer_demand

    counts = np.array([
        [50, 50, 0, 0, 0, 0, 0, 0],  # two experts do all the work: a third slot saves nothing
        [1, 1, 1, 1, 1, 1, 1, 1],  # spread over all eight: each slot saves most
        [40, 30, 10, 10, 5, 5, 0, 0],
    ])
    demand = layer_demand(counts, top_k=2)
    order = extra_slot_order(demand)
    gains = [lru_misses_per_token(row, 2) - lru_misses_per_token(row, 3) for row in demand[order(2)]]
    assert order(2)[-1] == 0 and gains[-1] == 0 and gains == sorted(gains, reverse=True) and gains[0] > 0.1
    assert order(8) == [0, 1, 2]  # nothing to gain anywhere: layer order
