"""The correlation table: hand counts, normalised tendencies, decay, profiles and their errors."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.core.tracegen import make_trace
from vllm_moe_offload.core.correlation import (
    CorrelationTable,
    ProfileError,
    build_profile_from_trace,
    load_profile,
)
from vllm_moe_offload.core.traces import load_trace, save_trace


def test_update_counts_every_pair_of_each_token():
    table = CorrelationTable(2, 4, 2)
    table.update(0, None, [[0, 1]])
    table.update(1, [[0, 1]], [[2, 3]])
    expected = np.zeros((4, 4))
    expected[np.ix_([0, 1], [2, 3])] = 1
    assert np.array_equal(table.pair_counts[1], expected)
    assert not table.pair_counts[0].any()  # layer 0 has no predecessor
    assert table.counts[0].tolist() == [1, 1, 0, 0] and table.counts[1].tolist() == [0, 0, 1, 1]
    assert table.tokens_seen == 1


def test_hot_sums_normalised_rows_not_raw_counts():
    # Expert 0 was seen 100 times before expert 2, expert 1 once before expert 3. Two tokens come
    # from expert 1 and one from expert 0: normalised, 3 wins 2 to 1; raw counts would pick 2.
    table = CorrelationTable(2, 4, 1)
    for _ in range(100):
        table.update(1, [[0]], [[2]])
    table.update(1, [[1]], [[3]])
    assert table.tendencies(1, [[1], [1], [0]]).tolist() == [0, 0, 1, 2]
    assert table.hot(1, [[1], [1], [0]], 2) == [3, 2]
    assert table.hot(1, [[1], [1], [0]], 1) == [3]


def test_layer_zero_and_unseen_rows_use_the_marginal():
    table = CorrelationTable(2, 4, 1)
    table.update(0, None, [[3], [3], [1]])
    table.update(1, None, [[2], [2], [0]])  # marginal only: no pair counted
    assert table.hot(0, None, 4) == [3, 1]  # only experts with a positive count
    assert table.hot(1, [[1]], 2) == [2, 0]  # row 1 never seen: layer 1's marginal
    table.update(1, [[1]], [[0]])
    assert table.hot(1, [[1]], 2) == [0]
    # a step of many tokens (not counted one by one) mixes seen rows and the marginal the same way
    many = [[1]] * 10 + [[2]] * 10  # row 1: all to 0; row 2 unseen: layer 1's marginal (2: 2/4, 0: 2/4)
    assert np.allclose(table.tendencies(1, many), [10 + 10 * 0.5, 0, 10 * 0.5, 0])


def test_empty_table_predicts_nothing_and_ties_go_to_the_frequent_then_lower_id():
    table = CorrelationTable(2, 4, 1)
    assert table.hot(0, None, 2) == [] and table.hot(1, [[0]], 2) == []
    table.update(1, [[0], [0]], [[3], [1]])  # row 0: 3 and 1 tie
    table.update(1, None, [[1]])  # 1 more frequent at layer 1
    assert table.hot(1, [[0]], 2) == [1, 3]
    table.update(1, None, [[3]])  # now equally frequent: lower id first
    assert table.hot(1, [[0]], 2) == [1, 3]


def test_decay_halves_older_observations():
    table = CorrelationTable(2, 2, 1, decay=0.5)
    table.update(1, [[0]], [[0]])
    table.update(1, [[0]], [[1]])
    assert table.pair_counts[1, 0].tolist() == [0.5, 1.0]
    assert table.hot(1, [[0]], 1) == [1]
    with pytest.raises(ValueError, match="decay"):
        CorrelationTable(2, 2, 1, decay=0.0)


def test_bad_arguments_are_refused():
    table = CorrelationTable(2, 4, 2)
    with pytest.raises(ValueError, match="outside"):
        table.update(2, None, [[0, 1]])
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        table.update(0, None, [[0, 4]])
    with pytest.raises(ValueError, match="tokens"):
        table.update(1, [[0, 1]], [[0, 1], [2, 3]])
    with pytest.raises(ValueError):
        CorrelationTable(2, 4, 5)


def test_profile_round_trip_and_geometry_check(tmp_path):
    table = CorrelationTable(3, 5, 2, model="m", layer_ids=[1, 2, 3], decay=0.9)
    rng = np.random.default_rng(0)
    ids = np.stack([rng.permutation(5)[:2] for _ in range(30 * 3)]).reshape(30, 3, 2)
    table.observe_tokens(ids)
    path = table.save(tmp_path / "p.npz", source="test")
    loaded = load_profile(path, geometry=(3, 5, 2))
    assert np.allclose(loaded.pair_counts, table.pair_counts) and np.allclose(loaded.counts, table.counts)
    assert (loaded.model, loaded.layer_ids, loaded.decay, loaded.tokens_seen) == ("m", (1, 2, 3), 0.9, 30)
    assert loaded.hot(2, ids[:4, 1], 3) == table.hot(2, ids[:4, 1], 3)
    with pytest.raises(ProfileError, match=r"\(3, 5, 2\).*\(3, 8, 2\)"):
        load_profile(path, geometry=(3, 8, 2))


def test_bad_profile_files_give_a_clear_error(tmp_path):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip at all")
    with pytest.raises(ProfileError, match="not a readable correlation profile"):
        load_profile(garbage)
    with pytest.raises(ProfileError, match="not a readable"):
        load_profile(tmp_path / "missing.npz")
    trace_path = save_trace(make_trace([[[0]]], num_experts=2), tmp_path / "trace.npz")
    with pytest.raises(ProfileError):
        load_profile(trace_path)  # a trace, not a profile
    path = CorrelationTable(2, 3, 1).save(tmp_path / "p.npz")
    with np.load(path) as data:
        meta = json.loads(str(data["meta"]))
        arrays = {key: data[key] for key in ("pair_counts", "counts")}
    newer = tmp_path / "newer.npz"
    np.savez(newer, meta=np.array(json.dumps({**meta, "format_version": 99})), **arrays)
    with pytest.raises(ProfileError, match="version 99"):
        load_profile(newer)
    wrong_shape = tmp_path / "shape.npz"
    np.savez(wrong_shape, meta=np.array(json.dumps(meta)), pair_counts=np.zeros((2, 3, 4)), counts=arrays["counts"])
    with pytest.raises(ProfileError, match="do not match"):
        load_profile(wrong_shape)
    negative = tmp_path / "negative.npz"
    np.savez(negative, meta=np.array(json.dumps(meta)), pair_counts=-np.ones((2, 3, 3)), counts=arrays["counts"])
    with pytest.raises(ProfileError, match="non-negative"):
        load_profile(negative)


def _write_shared_jsonl(path, rows):
    header = {"model": "tiny", "num_layers": 2, "num_experts": 4, "top_k": 1, "phase": "decode"}
    lines = [json.dumps(header)] + [
        json.dumps({"seq": seq, "pos": pos, "experts": experts, "gate_probs": [[1.0]] * 2})
        for seq, pos, experts in rows
    ]
    path.write_text("\n".join(lines) + "\n")


def test_profile_from_npz_and_shared_jsonl_traces(tmp_path):
    rows = [(0, 0, [[0], [1]]), (0, 1, [[0], [1]]), (1, 0, [[2], [3]])]
    _write_shared_jsonl(tmp_path / "t.jsonl", rows)
    from_jsonl = build_profile_from_trace(load_trace(tmp_path / "t.jsonl"))
    npz = save_trace(make_trace([r[2] for r in rows], num_experts=4, seq_ids=[0, 0, 1]), tmp_path / "t.npz")
    from_npz = build_profile_from_trace(load_trace(npz))
    for table in (from_jsonl, from_npz):
        assert table.geometry == (2, 4, 1)
        assert table.pair_counts[1, 0, 1] == 2 and table.pair_counts[1, 2, 3] == 1
        assert table.hot(1, [[0]], 1) == [1] and table.hot(0, None, 1) == [0]
    only_first = build_profile_from_trace(load_trace(npz), rows=np.array([2]))
    assert only_first.pair_counts[1].sum() == 1 and only_first.pair_counts[1, 2, 3] == 1
    decayed = build_profile_from_trace(load_trace(npz), decay=0.5)  # step by step: 3 steps
    assert decayed.pair_counts[1, 2, 3] == 1 and decayed.pair_counts[1, 0, 1] == (1 * 0.5 + 1) * 0.5


@st.composite
def routed_steps(draw):
    num_experts = draw(st.integers(2, 6))
    top_k = draw(st.integers(1, min(3, num_experts)))
    token = st.lists(st.integers(0, num_experts - 1), min_size=top_k, max_size=top_k, unique=True)
    # up to 12 tokens of up to 3 ids: steps on both sides of the small-step paths (16 ids)
    steps = draw(st.lists(st.lists(st.tuples(token, token), min_size=1, max_size=12), min_size=1, max_size=5))
    return num_experts, top_k, steps


@settings(max_examples=100, deadline=None)
@given(routed_steps(), st.integers(0, 7), st.randoms(use_true_random=False))
def test_laws_of_counts_and_tendencies(case, k, rnd):
    num_experts, top_k, steps = case
    by_step = CorrelationTable(2, num_experts, top_k)
    by_token = CorrelationTable(2, num_experts, top_k)
    for step in steps:
        prev, cur = [t[0] for t in step], [t[1] for t in step]
        by_step.update(1, prev, cur)
        for p, c in zip(prev, cur):
            by_token.update(1, [p], [c])
    # Counting is additive: a step of T tokens counts what T one-token steps count.
    assert np.array_equal(by_step.pair_counts, by_token.pair_counts)
    assert by_step.pair_counts[1].sum() == sum(len(s) for s in steps) * top_k * top_k
    query = [t[0] for t in steps[-1]]
    # Every (token, expert) of the step adds one normalised row: the tendencies sum to T * top_k.
    assert np.isclose(by_step.tendencies(1, query).sum(), len(query) * top_k)
    # Rows the step chose, normalised and summed: the step's uses times the layer's transition.
    uses = np.bincount(np.ravel(query), minlength=num_experts)
    assert np.allclose(by_step.tendencies(1, query), uses @ by_step.transition(1))
    hot = by_step.hot(1, query, k)
    scores = by_step.tendencies(1, query)
    assert len(hot) == len(set(hot)) <= k and all(0 <= e < num_experts for e in hot)
    # Most wanted first; scores equal but for float rounding count as a tie (ranked by marginal, then id).
    assert all(scores[a] >= scores[b] - 1e-9 * scores.max() for a, b in zip(hot, hot[1:]))
    # Neither token order nor the scale of the counts changes the answer.
    shuffled = list(query)
    rnd.shuffle(shuffled)
    assert by_step.hot(1, shuffled, k) == hot
    by_step.pair_counts *= 3.0
    by_step.counts *= 3.0
    assert by_step.hot(1, query, k) == hot


def test_hot_does_not_depend_on_token_order_in_float_ties():
    # Experts 0 and 1 tie at 7/3 each, but summed in another token order their floats differ in the last
    # bit (found by the law above): the answer must not follow the rows' order.
    table = CorrelationTable(2, 4, 2)
    table.update(1, [[0, 1], [0, 1]], [[1, 2], [1, 2]])
    step = [([0, 2], [0, 1]), ([1, 2], [0, 2]), ([2, 3], [0, 1])]
    table.update(1, [t[0] for t in step], [t[1] for t in step])
    query = [t[0] for t in step]
    answers = {tuple(table.hot(1, list(order), 1)) for order in itertools.permutations(query)}
    assert answers == {(1,)}  # the tie goes to the more frequent expert (1 counted 4 times, 0 three)
