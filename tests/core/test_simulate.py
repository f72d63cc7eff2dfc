"""The replay: hand-counted LRU, budgets, prefetch accounting, and the laws every run obeys."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import json

import numpy as np

from tests.core.tracegen import make_trace, one_layer
from vllm_moe_offload.cli.main import main
from vllm_moe_offload.core.belady import belady_misses
from vllm_moe_offload.core.correlation import CorrelationTable, load_profile
from vllm_moe_offload.core.predictors import make_predictor
from vllm_moe_offload.core.prefetch_eval import prefetch_accuracy, prefetch_sweep, rebatch_trace, split_trace
from vllm_moe_offload.core.schedule import SlotBudget, build_schedules, parse_budgets
from vllm_moe_offload.core.simulate import PolicySpec, resolve_policies, simulate
from vllm_moe_offload.core.traces import save_trace


def _run(trace, slots, policy, **kw) -> dict:
    return simulate(trace, [slots], [policy], **kw)["results"][0]["policies"][PolicySpec.parse(policy).name]


def test_lru_hand_counts_in_both_orders():
    # 2 slots, steps [0, 1] then [2, 0]. Step 1 in sequential order: 2 misses and evicts the
    # least recent, 0 (used before 1), then 0 misses too. In step order 0 is pinned, 1 leaves.
    trace = one_layer([0, 1], [2, 0], num_experts=4)
    sequential = _run(trace, 2, "lru")
    step = _run(trace, 2, "lru", order="step")
    assert (sequential["misses"], sequential["cache_hits"]) == (4, 0)
    assert (step["misses"], step["cache_hits"]) == (3, 1)
    assert _run(trace, 2, "belady")["misses"] == _run(trace, 2, "belady", order="step")["misses"] == 3


def test_lru_counts_over_a_longer_run():
    # 3 slots, top-1: 0 1 2 0 3 0 1 -> misses 0 1 2, hit 0, miss 3 (evicts 1), hit 0, miss 1 (evicts 2).
    trace = one_layer([0], [1], [2], [0], [3], [0], [1], num_experts=4)
    lru = _run(trace, 3, "lru")
    assert (lru["misses"], lru["cache_hits"], lru["demand_hit_rate"]) == (5, 2, 2 / 7)
    assert lru["bytes_moved"] == 5  # one expert unit each


def test_per_sequence_caches_start_cold_and_shared_ones_do_not():
    # Two sequences, each routed to 0 then 0: per sequence, each misses once.
    trace = make_trace([[[0]], [[0]], [[0]], [[0]]], num_experts=2, seq_ids=[0, 1, 0, 1], step_ids=[0, 0, 1, 1])
    assert _run(trace, 1, "lru")["misses"] == 2
    shared = _run(trace, 1, "lru", mode="shared")
    assert (shared["misses"], shared["needed"], shared["steps"]) == (1, 2, 2)  # one need per step


def test_shared_steps_split_into_passes_that_fit():
    # One step of two tokens needing {0, 1} and {2, 3} with 2 slots: two passes.
    trace = make_trace([[[0, 1]], [[2, 3]]], num_experts=4, seq_ids=[0, 1], step_ids=[0, 0])
    (schedule,) = build_schedules(trace, "shared", [2])
    assert schedule[0].passes == [[[0, 1], [2, 3]]]
    assert _run(trace, 2, "lru", mode="shared")["max_resident"] == 2


def test_budgets_parse_and_resolve():
    assert [str(b) for b in parse_budgets("12.5%,25%, 2")] == ["12.5%", "25%", "2"]
    assert [b.resolve(8) for b in parse_budgets("12.5%,25%,50%,100%,20")] == [1, 2, 4, 8, 8]
    assert SlotBudget.parse("30%").resolve(60) == 18
    for bad in ("0", "0%", "101%", "half", "-1"):
        with pytest.raises(ValueError):
            SlotBudget.parse(bad)


def test_budget_below_top_k_is_refused():
    trace = one_layer([0, 1], num_experts=4)
    with pytest.raises(ValueError, match="fewer than top_k=2"):
        simulate(trace, [SlotBudget(fraction=0.25)], ["lru"])


def test_every_budget_is_respected_and_reported_with_belady():
    trace = one_layer([0, 1], [2, 3], [1, 2], [0, 3], num_experts=4)
    report = simulate(trace, [2, 3, 4], ["lru", "lfu"])
    assert report["policies"] == ["lru", "lfu", "belady"]
    for entry in report["results"]:
        for stats in entry["policies"].values():
            assert all(layer["max_resident"] <= entry["slots_per_layer"] for layer in stats["per_layer"])
    assert report["results"][-1]["policies"]["belady"]["misses"] == 4  # everything fits: cold misses only


def test_oracle_prefetch_makes_everything_ready():
    trace = one_layer([0, 1], [2, 3], [1, 2], [0, 3], num_experts=4)
    oracle = _run(trace, 2, "lru+oracle")
    assert oracle["ready_rate"] == 1.0 and oracle["misses"] == 0
    assert (oracle["precision"], oracle["recall"]) == (1.0, 1.0)
    assert oracle["demand_hit_rate"] < 1.0  # prefetched experts are not demand hits
    assert oracle["loads"] >= _run(trace, 2, "belady")["loads"]


def test_policy_specs():
    assert PolicySpec.parse("eap").name == "lru+eap"
    assert PolicySpec.parse("corr").name == "lru+corr"
    assert [s.name for s in resolve_policies(["lru", "LRU", "belady", "lfu+oracle"])] == ["lru", "belady", "lfu+oracle"]
    for bad in ("mru", "lru+fate", "belady+eap"):
        with pytest.raises(ValueError):
            PolicySpec.parse(bad)


@st.composite
def traces(draw):
    num_experts = draw(st.integers(2, 6))
    top_k = draw(st.integers(1, min(3, num_experts)))
    num_layers = draw(st.integers(1, 2))
    num_rows = draw(st.integers(1, 14))
    token = st.lists(st.integers(0, num_experts - 1), min_size=top_k, max_size=top_k, unique=True)
    row = st.lists(token, min_size=num_layers, max_size=num_layers)
    rows = draw(st.lists(row, min_size=num_rows, max_size=num_rows))
    seq_ids = draw(st.lists(st.integers(0, 2), min_size=num_rows, max_size=num_rows))
    steps = sorted(draw(st.lists(st.integers(0, 4), min_size=num_rows, max_size=num_rows)))
    capacity = draw(st.integers(top_k, num_experts))
    return make_trace(rows, num_experts, seq_ids=seq_ids, step_ids=steps), capacity


POLICIES = ["lru", "lfu", "ondemand", "lru+eap", "lfu+eap", "ondemand+oracle", "lru+corr", "belady"]


@settings(max_examples=150, deadline=None)
@given(traces(), st.sampled_from(["per-sequence", "shared"]), st.sampled_from(["sequential", "step"]))
def test_nothing_beats_belady_and_no_cache_overflows(case, mode, order):
    trace, capacity = case
    report = simulate(trace, [capacity], POLICIES, mode=mode, order=order)
    results = report["results"][0]["policies"]
    belady = results["belady"]
    schedules = build_schedules(trace, mode, [capacity] * trace.num_trace_layers)
    expected = sum(
        belady_misses([p for step in schedule for p in step.passes[layer]], trace.meta.num_experts, capacity)
        for schedule in schedules
        for layer in range(trace.num_trace_layers)
    )
    assert belady["misses"] == expected
    for name, stats in results.items():
        assert stats["loads"] >= belady["loads"], name
        if "+" not in name:  # without prefetch a miss is the only way in
            assert stats["misses"] >= belady["misses"], name
            assert stats["demand_hit_rate"] <= belady["demand_hit_rate"] + 1e-12, name
        for layer in stats["per_layer"]:
            assert layer["max_resident"] <= capacity, name
        assert stats["cache_hits"] + stats["prefetch_hits"] + stats["misses"] == stats["needed"]


def _chain_trace(num_steps: int, tokens_per_step: int = 1, shift: int = 1) -> object:
    """Two layers, 4 experts, top-1: layer 1 is always (layer 0 + shift) % 4; layer 0 cycles."""
    rows = [[[t % 4], [(t + shift) % 4]] for t in range(num_steps * tokens_per_step)]
    steps = [t // tokens_per_step for t in range(len(rows))]
    return make_trace(rows, num_experts=4, seq_ids=[t % tokens_per_step for t in range(len(rows))], step_ids=steps)


def test_rebatch_groups_rows_in_step_order():
    trace = make_trace([[[e]] for e in (0, 1, 2, 3, 0)], num_experts=4, seq_ids=[0, 1, 0, 1, 0],
                       step_ids=[0, 0, 1, 1, 2])
    grouped = rebatch_trace(trace, 2)
    assert grouped.step_ids.tolist() == [0, 0, 1, 1, 2]
    assert [r.tolist() for r in grouped.step_rows()] == [[0, 1], [2, 3], [4]]
    assert grouped.topk_ids[:, 0, 0].tolist() == [0, 1, 2, 3, 0]
    assert len(rebatch_trace(trace, 1).step_rows()) == 5
    with pytest.raises(ValueError):
        rebatch_trace(trace, 0)


def test_split_keeps_whole_steps_and_time_order():
    trace = _chain_trace(6, tokens_per_step=2)
    warm, rest = split_trace(trace, 0.5)
    assert warm.step_ids.max() < rest.step_ids.min()
    assert warm.num_tokens + rest.num_tokens == trace.num_tokens and warm.num_tokens % 2 == 0
    assert split_trace(trace, 0.0) == (None, trace)
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError):
            split_trace(trace, bad)
    with pytest.raises(ValueError, match="leaves no step"):
        split_trace(trace, 0.99)


def test_corr_learns_the_successor_and_beats_eap():
    trace = _chain_trace(40)
    corr = prefetch_accuracy(trace, make_predictor("corr", 1))
    # Layer 1 is right once each layer-0 expert was seen: 4 cold starts, the first with an empty
    # table (no prediction), the next three guessing the marginal wrongly. Layer 0 (marginal
    # only) is right about once in four.
    layer1 = corr["per_layer"][1]
    assert (layer1["precision"], layer1["recall"]) == (36 / 39, 36 / 40)
    assert corr["per_layer"][0]["precision"] == pytest.approx(10 / 39, abs=0.05)
    eap = prefetch_accuracy(trace, make_predictor("eap", 1))
    assert eap["per_layer"][1]["precision"] < layer1["precision"]
    oracle = prefetch_accuracy(trace, make_predictor("oracle", 1))
    assert oracle["precision"] == oracle["recall"] == 1.0


def test_warmup_and_profile_start_corr_warm_without_seeing_the_evaluated_steps():
    trace = _chain_trace(40)
    warm, rest = split_trace(trace, 0.5)
    warmed = prefetch_accuracy(rest, make_predictor("corr", 1, warmup=warm))
    assert warmed["per_layer"][1]["precision"] == 1.0  # no cold start left
    profile = CorrelationTable(2, 4, 1)
    profile.observe_tokens(warm.topk_ids)
    from_profile = prefetch_accuracy(rest, make_predictor("corr", 1, profile=profile))
    assert from_profile["per_layer"][1]["precision"] == 1.0
    assert not profile.pair_counts[1, 0, 2]  # the predictor learnt on a copy
    # No leakage: a warm-up on another mapping predicts that mapping, so the first step of the rest misses.
    other = _chain_trace(20, shift=2)
    first_step = split_trace(trace, 0.97)[1]
    assert first_step.num_tokens == 1
    assert prefetch_accuracy(first_step, make_predictor("corr", 1, warmup=other))["per_layer"][1]["precision"] == 0


def test_simulate_with_batches_warmup_and_corr():
    trace = _chain_trace(40)
    report = simulate(trace, [2], ["lru+corr", "lru+eap"], mode="shared", batch=4, warmup=0.5)
    assert (report["batch"], report["warmup_tokens"]) == (4, 20)
    corr = report["results"][0]["policies"]["lru+corr"]
    assert corr["steps"] == 5 and corr["per_layer"][1]["precision"] == 1.0
    with pytest.raises(ValueError, match="geometry|num_layers"):
        simulate(trace, [2], ["lru+corr"], profile=CorrelationTable(3, 4, 1))


def test_prefetch_sweep_reports_every_combination():
    report = prefetch_sweep(_chain_trace(40), ["corr", "oracle"], [1, 2], [1, 4], warmup=0.25)
    assert [(r["batch"], r["predictor"], r["k"]) for r in report["results"]] == [
        (b, p, k) for b in (1, 4) for p in ("corr", "oracle") for k in (1, 2)
    ]
    assert all(r["precision"] == 1.0 for r in report["results"] if r["predictor"] == "oracle")


def test_cli_sweep_save_profile_and_errors(tmp_path, capsys):
    path = save_trace(_chain_trace(40), tmp_path / "chain.npz")
    profile = tmp_path / "chain-profile.npz"
    rc = main(["simulate", str(path), "--prefetch-sweep", "1,2", "--batch", "1,4", "--warmup", "0.5",
               "--save-profile", str(profile), "--out", str(tmp_path), "--name", "s", "--no-progress"])
    assert rc == 0
    report = json.loads((tmp_path / "s-prefetch.json").read_text())
    assert len(report["results"]) == 2 * 3 * 2
    assert (tmp_path / "s-prefetch.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert load_profile(profile).pair_counts[1, 0, 1] == 10
    rc = main(["simulate", str(path), "--policies", "lru+corr", "--profile", str(profile), "--batch", "4",
               "--budgets", "2", "--out", str(tmp_path), "--name", "r", "--no-progress"])
    assert rc == 0
    replay = json.loads((tmp_path / "r.json").read_text())
    assert (replay["mode"], replay["batch"], replay["profile"]) == ("shared", 4, True)
    assert replay["results"][0]["policies"]["lru+corr"]["precision"] > 0.9
    other = save_trace(make_trace([[[0], [1], [2]]], num_experts=4), tmp_path / "three.npz")
    assert main(["simulate", str(other), "--profile", str(profile), "--budgets", "2", "--out", str(tmp_path),
                 "--no-progress"]) == 2
    assert main(["simulate", str(path), "--batch", "1,4", "--budgets", "2", "--out", str(tmp_path),
                 "--no-progress"]) == 2
    printed = capsys.readouterr().out
    assert "rebuild the profile" in printed and "several --batch sizes need --prefetch-sweep" in printed
    assert np.isfinite(report["results"][0]["precision"])
