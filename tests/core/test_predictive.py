"""``nextuse`` (core/predictive.py): its memory by hand, Belady on a periodic trace, and the laws every cache obeys."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.core.test_frequency import access_lists, replay_misses
from tests.core.tracegen import make_trace, one_layer
from vllm_moe_offload.core.belady import belady_misses
from vllm_moe_offload.core.policies_extra import SIM_POLICY_NAMES, make_sim_policy
from vllm_moe_offload.core.predictive import ContinuationMemory, NextUsePolicy, StepPaths, link_layers
from vllm_moe_offload.core.replacement import REPLACEMENT_NAMES, make_policy
from vllm_moe_offload.core.simulate import ALL_POLICIES, simulate

#: one period of 8 steps over 8 experts, top-2: with 4 slots LRU and decay lose to Belady every period
PERIOD = [[0, 1], [2, 3], [4, 5], [0, 2], [6, 7], [1, 3], [4, 6], [5, 7]]


def periodic(repeats: int, tokens: bool) -> object:
    """``PERIOD`` repeated; input tokens repeat with it (``tokens``) or are unknown (-1)."""
    trace = one_layer(*[step for _ in range(repeats) for step in PERIOD], num_experts=8)
    n = trace.num_tokens
    token_ids = np.arange(n, dtype=np.int32) % len(PERIOD) if tokens else np.full(n, -1, np.int32)
    return dataclasses.replace(trace, token_ids=token_ids)


def misses(trace, order: str) -> dict[str, int]:
    report = simulate(trace, [4], ["lru", "decay", "nextuse"], order=order)
    return {name: s["misses"] for name, s in report["results"][0]["policies"].items()}


def test_registered_for_the_engine_and_the_simulator():
    assert "nextuse" in REPLACEMENT_NAMES and "nextuse" in SIM_POLICY_NAMES and "nextuse" in ALL_POLICIES
    assert isinstance(make_policy("nextuse", 8, 4, top_k=2), NextUsePolicy)
    assert isinstance(make_sim_policy("nextuse", 8, 4, 2), NextUsePolicy)


@pytest.mark.parametrize("order", ["step", "sequential"])
@pytest.mark.parametrize("tokens", [True, False], ids=["token-keys", "routing-keys"])
def test_periodic_trace_reaches_belady_after_one_period(order, tokens):
    short, long = misses(periodic(10, tokens), order), misses(periodic(40, tokens), order)
    # 30 more periods cost nextuse exactly what they cost Belady (it only pays while it learns the first)
    assert long["nextuse"] - short["nextuse"] == long["belady"] - short["belady"] == 270
    # learning the first period costs it 5 misses (4 before path neighbours: in the first period a partly
    # similar step's continuation misleads it once)
    assert long["nextuse"] - long["belady"] == 5
    # the others pay every period
    assert long["lru"] - short["lru"] >= 420 and long["decay"] - short["decay"] >= 420


def test_memory_predicts_the_continuation_of_the_longest_match():
    memory = ContinuationMemory()
    # keys a b c x | a b d y | a b   -> the current step repeats "a b" twice; c (after "a b" ... "c") matches
    for key, used in [("a", {0}), ("b", {1}), ("c", {2}), ("x", {3}), ("z", {4}), ("b", {5}), ("c", {6}), ("y", {7})]:
        memory.record(key, used)
    memory.record("a", {0})
    memory.record("b", {1})
    # now the current step's key is "c": preceded by "a b", matching occurrence 2 by 3 keys, occurrence 6 by 2
    got = memory.predict("c", neighbours=1, horizon=2, gamma=0.5, max_match=8)
    assert got == {3: 3 * 0.5, 4: 3 * 0.25}
    both = memory.predict("c", neighbours=2, horizon=1, gamma=0.5, max_match=8)
    assert both == {3: 1.5, 7: 1.0}
    assert memory.predict("q", neighbours=3, horizon=4, gamma=0.5, max_match=8) == {}


def test_memory_continuation_stops_at_what_has_ended_and_at_a_new_sequence():
    memory = ContinuationMemory()
    memory.record("a", {0})
    memory.record("b", {1})
    # the step after "b" is the current one: nothing ended after the match yet
    assert memory.predict("b", neighbours=1, horizon=4, gamma=1.0, max_match=8) == {}
    memory.break_sequence()
    # a new sequence starts with "a": the earlier "a" continued with {1}
    assert memory.predict("a", neighbours=1, horizon=4, gamma=1.0, max_match=8) == {1: 1.0}
    memory.record("b", {3})
    # a "b" at the end of the last sequence continues into the barrier (nothing), not into this sequence
    assert memory.predict("b", neighbours=2, horizon=1, gamma=1.0, max_match=8) == {}


def test_memory_is_bounded_and_keeps_predicting():
    memory = ContinuationMemory(max_steps=16, max_occurrences=2)
    for i in range(100):
        memory.record(i % 5, {i % 5})
    assert len(memory) == 100 and len(memory._keys) <= 16
    assert all(len(v) <= 2 for v in memory._where.values())
    assert memory.predict(0, neighbours=1, horizon=1, gamma=1.0, max_match=8) == {1: 8.0}


def test_spares_the_whole_pass_even_when_only_part_of_it_is_pinned():
    policy = NextUsePolicy(num_experts=6, capacity=4)
    for step in ([0, 1], [2, 3], [0, 1], [2, 3]):
        for e in step:
            policy.on_access(e, hit=True)
        policy.on_step_end()
    # experts 2 and 3 are the most recent and most frequent; the pass needs 5 and 0 (0 served, 5 entering)
    policy.begin_pass_needs({0, 5})
    policy.on_access(0, hit=True)
    victim = policy.choose_victim({0, 1, 2, 3}, pinned={0})
    assert victim != 0 and victim in {1, 2, 3}
    # when every other resident is needed too, the pinned rule alone decides
    policy.begin_pass_needs({0, 1, 2, 3, 5})
    assert policy.choose_victim({0, 1, 2, 3}, pinned={0}) in {1, 2, 3}


@settings(max_examples=150, deadline=None)
@given(access_lists(), st.booleans())
def test_capacity_pinning_and_belady_bound(case, pin_pass):
    passes, num_experts, capacity = case
    assert replay_misses("nextuse", passes, num_experts, capacity, pin_pass) >= belady_misses(
        passes, num_experts, capacity
    )


def test_deterministic_and_memory_carried_across_sequences():
    # two sequences of the same periodic text: the second one's cache starts cold but its memory does not
    steps = [step for _ in range(3) for step in PERIOD]
    rows = [[s] for s in steps + steps]
    trace = make_trace(rows, 8, seq_ids=[0] * len(steps) + [1] * len(steps))
    trace = dataclasses.replace(trace, token_ids=np.arange(len(rows), dtype=np.int32) % len(PERIOD))
    first = simulate(trace, [4], ["nextuse"])
    assert first == simulate(trace, [4], ["nextuse"])
    got = first["results"][0]["policies"]
    # Belady's cold start costs it 4 misses per sequence; nextuse pays its learning period (5) once
    assert got["nextuse"]["misses"] - got["belady"]["misses"] == 5


def _store(paths: StepPaths, *layers: set[int]) -> None:
    for layer_idx, experts in enumerate(layers):
        paths.observe(layer_idx, experts)
    for layer_idx in range(len(layers)):
        paths.end_layer(layer_idx)


def test_paths_vote_by_similarity_over_the_layers_routed_so_far():
    paths = StepPaths(num_layers=2, num_experts=8, window=16)
    for layer0, layer1 in [({0, 1}, {0, 1}), ({6, 7}, {2, 3}), ({2, 3}, {0, 1}), ({6, 7}, {4, 5})]:
        _store(paths, layer0, layer1)
    assert len(paths) == 4
    # the running step so far: layer 0 routed like step 0 (2 shared experts), not like step 2 (none)
    paths.observe(0, {0, 1})
    # one neighbour: step 0, whose next step used {2, 3} at layer 1; step 3 (the latest) has no ended continuation
    assert paths.predict(1, neighbours=1, horizon=1, gamma=0.5) == {2: 0.5, 3: 0.5}
    # two steps ahead: step 0's second step is step 2 ({0, 1} at layer 1)
    assert paths.predict(1, neighbours=1, horizon=2, gamma=0.5) == {2: 0.5, 3: 0.5, 0: 0.25, 1: 0.25}
    # layer 1's own experts join the similarity: now steps 0 (4 shared) and 2 (2 shared) vote, by share (of the
    # 5 neighbours asked for, only they share anything)
    paths.observe(1, {0, 1})
    got = paths.predict(1, neighbours=5, horizon=1, gamma=1.0)
    assert got == pytest.approx({2: 4 / 6, 3: 4 / 6, 4: 2 / 6, 5: 2 / 6})
    paths.end_layer(0)
    paths.end_layer(1)
    # a step similar to nothing gets no vote
    paths.observe(0, {4, 5})
    assert paths.predict(0, neighbours=3, horizon=4, gamma=1.0) == {}
    # a new sequence stores the running step (5) and a barrier (6), once however many layers ask
    paths.break_sequence()
    paths.break_sequence()
    assert len(paths) == 7
    _store(paths, {6, 7}, {2, 3})  # step 7
    _store(paths, {0, 1}, {0, 1})  # step 8
    # the latest neighbours among equals: steps 7 and 3 (not 1) share {6, 7}; step 3 continues to 4, 5, then stops
    paths.observe(0, {6, 7})
    assert paths.predict(1, neighbours=2, horizon=4, gamma=1.0) == pytest.approx({0: 1.0, 1: 1.0})
    paths.end_layer(0)
    paths.end_layer(1)
    # like step 5 only, whose continuation is the barrier: it does not reach step 7 across it
    paths.observe(0, {4, 5})
    assert paths.predict(1, neighbours=1, horizon=4, gamma=1.0) == {}


def test_paths_reject_bad_sizes():
    with pytest.raises(ValueError, match="window"):
        StepPaths(num_layers=2, num_experts=8, window=1)


def _linked_history(context: set[int]) -> NextUsePolicy:
    """Two linked layers; after layer 0 used {0, 1} layer 1 uses {2, 3} next, after {2, 3} it uses {4, 5}.

    The running step: layer 0 used ``context``, layer 1 needs {6, 7}, a routing it never had (so its own
    memory predicts nothing). Returns layer 1's policy.
    """
    layers = [NextUsePolicy(num_experts=8, capacity=4) for _ in range(2)]
    link_layers(layers, num_experts=8)

    def run(step: list[set[int]]) -> None:
        for policy, needed in zip(layers, step):
            policy.begin_step_tokens([-1])
            policy.begin_pass_needs(needed)
            for expert in needed:
                policy.on_access(expert, hit=True)

    for step in [[{0, 1}, {0, 1}], [{6, 7}, {2, 3}], [{2, 3}, {0, 1}], [{6, 7}, {4, 5}]] * 6:
        run(step)
        for policy in layers:
            policy.on_step_end()
    run([context, {6, 7}])
    return layers[1]


@pytest.mark.parametrize(("context", "victim"), [({0, 1}, 4), ({2, 3}, 2)])
def test_earlier_layers_of_the_step_choose_the_victim(context, victim):
    # layer 1's history and routing are the same in both cases (2 and 4 used equally often): only layer 0's
    # routing of the running step tells which of them the next step needs
    policy = _linked_history(context)
    assert policy.choose_victim({2, 4, 6, 7}, pinned={6, 7}) == victim
    # unlinked, the same history evicts the same expert whatever layer 0 did
    policy.paths, policy._predicted = None, None
    assert policy.choose_victim({2, 4, 6, 7}, pinned={6, 7}) == 2
