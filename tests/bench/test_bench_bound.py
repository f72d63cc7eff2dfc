"""The physical bound of ``vllm-moe-offload bench`` (optimal loads, fractions, the bandwidth probe), and ``bench --quick`` end to end."""

from __future__ import annotations

import json
import os
import re
from itertools import combinations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import TINY_PYMOE
from vllm_moe_offload.cli.bench_bound import (
    MIN_LOADS_FOR_RATE, achieved_gbps, causal_floor_s, layer_accesses, median_time_s, optimal_loads, phase_floors,
    phase_timings, pooled_routing_loads, read_bandwidth, resident_floor_s, routing_loads, stored_expert_bytes, timings,
    workload_bound,
)
from vllm_moe_offload.cli.bench import merge_repeats
from vllm_moe_offload.cli.main import main
from vllm_moe_offload.core.belady import belady_misses

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_hand_example():
    # 2 slots; steps need {0,1}, {2}, {0}, {1}, {2}.
    # Cold: 0 and 1 load; 2 loads and evicts 1 (needed at step 3, after 0 at step 2);
    # 0 hits; 1 loads and evicts 0 (never needed again); 2 hits: 4 loads.
    # Warm: the cache starts with 0 and 1 (needed first), so only 2 and the reload of 1: 2 loads.
    accesses = [{0, 1}, {2}, {0}, {1}, {2}]
    assert optimal_loads(accesses, 4, 2, warm=False) == 4 == belady_misses(accesses, 4, 2)
    assert optimal_loads(accesses, 4, 2) == 2


def test_a_step_larger_than_the_cache_loads_each_expert_once():
    # 3 experts in one step with 2 slots: each loaded once, then 0 (needed next) is kept
    assert optimal_loads([{0, 1, 2}, {0}], 4, 2, warm=False) == 3
    assert optimal_loads([{0, 1, 2}, {0}], 4, 2) == 1  # 0 and 1 were there from the start
    assert optimal_loads([{0, 1, 2, 3}], 4, 4) == 0  # every expert resident


def test_routing_to_loads_per_layer_and_merged_prefill():
    # [step][token][layer][k]: 2 layers, top-2; layer 0 needs {0,1} then {2,3}, layer 1 always {0,1}
    steps = [[[[0, 1], [0, 1]]], [[[2, 3], [1, 0]]]]
    assert layer_accesses(steps, 2) == [[{0, 1}, {2, 3}], [{0, 1}, {0, 1}]]
    assert layer_accesses(steps, 2, merge=True) == [[{0, 1, 2, 3}], [{0, 1}]]
    assert routing_loads(steps, [2, 2], 4) == [2, 0]
    assert routing_loads(steps, [2, 2], 4, merge=True) == [2, 0]
    assert routing_loads(steps, [4, 2], 4) == [0, 0]
    with pytest.raises(ValueError, match="2 MoE layers, the run 3"):
        routing_loads(steps, [2, 2, 2], 4)


def brute_force_loads(accesses: list[set[int]], num_experts: int, capacity: int, warm: bool) -> int:
    """Fewest loads over every choice of what to keep after each step (the model of ``optimal_loads``)."""
    states = {frozenset(c): 0 for n in range(capacity + 1) for c in combinations(range(num_experts), n)} \
        if warm else {frozenset(): 0}
    for needed in accesses:
        following: dict[frozenset, int] = {}
        for resident, cost in states.items():
            cost += len(needed - resident)
            pool = sorted(resident | needed)
            for n in range(min(capacity, len(pool)) + 1):
                for keep in map(frozenset, combinations(pool, n)):
                    if len(needed) <= capacity and not needed <= keep:
                        continue  # a step that fits holds its experts at once
                    following[keep] = min(following.get(keep, cost), cost)
        states = following
    return min(states.values())


@st.composite
def cases(draw):
    num_experts = draw(st.integers(2, 5))
    capacity = draw(st.integers(1, num_experts))
    steps = draw(st.lists(st.sets(st.integers(0, num_experts - 1), min_size=1), min_size=1, max_size=6))
    return steps, num_experts, capacity


@settings(max_examples=300, deadline=None)
@given(cases(), st.booleans())
def test_optimal_loads_is_optimal(case, warm):
    steps, num_experts, capacity = case
    assert optimal_loads(steps, num_experts, capacity, warm) == brute_force_loads(steps, num_experts, capacity, warm)
    if not warm and all(len(s) <= capacity for s in steps):
        assert optimal_loads(steps, num_experts, capacity, warm) == belady_misses(steps, num_experts, capacity)


def test_a_shared_pool_is_bounded_by_one_optimal_cache():
    # layer 0 cycles over experts 0, 1, 2; layer 1 always needs expert 3; 2 slots each, or one pool of 4
    steps = [[[[e], [3]]] for e in [0, 1, 2] * 4]  # [step][token][layer][k]
    assert routing_loads(steps, [2, 2], 4) == [5, 0]  # warm with 0 and 1: every third step a reload or two
    assert pooled_routing_loads(steps, [2, 2], 4) == [0, 0]  # warm with the 4 needed first: all of them fit
    assert pooled_routing_loads(steps, [2, 1], 4) == [5, 0] == routing_loads(steps, [2, 1], 4)  # 3 keeps its slot
    assert pooled_routing_loads(steps, [4, 2], 4) == [0, 0]  # layer 0 whole, layer 1 alone in the pool


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 5), min_size=2, max_size=2), min_size=1, max_size=30),
       st.lists(st.integers(2, 5), min_size=2, max_size=2))
def test_one_pool_never_loads_more_than_pools_per_layer(needs, layer_slots):
    steps = [[[[a], [b]]] for a, b in needs]
    assert sum(pooled_routing_loads(steps, layer_slots, 6)) <= sum(routing_loads(steps, layer_slots, 6))


def test_workload_bound():
    # 4 loads of 1 MB at 2 GB/s: 2 ms of I/O under a 10 ms compute floor; the run took 20 ms
    b = workload_bound([3, 1], 10**6, 2.0, 0.010, 0.020)
    assert b["loads"] == 4 and b["bytes"] == 4 * 10**6 and b["io_floor_s"] == pytest.approx(0.002)
    assert (b["bound_s"], b["limited_by"], b["fraction"]) == (0.010, "compute", 0.5)
    # 400 loads: 200 ms of I/O; the run took 250 ms
    b = workload_bound([400], 10**6, 2.0, 0.010, 0.250)
    assert b["bound_s"] == pytest.approx(0.2) and b["limited_by"] == "I/O"
    assert b["fraction"] == pytest.approx(0.8)


def test_causal_floor_of_one_request():
    # the prompt's step: 30 loads of 100 MB at 4 GB/s = 0.75 s, above the all-resident 0.3 s to the first
    # token; then 31 tokens at 46 ms
    assert causal_floor_s(30, 10**8, 4.0, 0.3, 31 * 0.046) == pytest.approx(0.75 + 1.426)
    # no load in the prompt's step (it fits the warm cache): the all-resident time to the first token
    assert causal_floor_s(0, 10**8, 4.0, 0.3, 1.0) == pytest.approx(1.3)
    # per engine configuration the median time to the first token and the median time of the tokens after
    # it, over its timings; the lowest of those medians; workloads of several requests have no such phases
    stock = {"requests": 1, "generated_tokens": 5, "ttft_s": 0.4, "tpot_s": 0.05,
             "round_ttft_s": [0.3, 0.5], "round_tpot_s": [0.06, 0.04]}
    routing = {"requests": 1, "generated_tokens": 5, "ttft_s": 0.35, "tpot_s": None}
    batch = {"requests": 4, "generated_tokens": 20, "ttft_s": 0.01, "tpot_s": 0.001}
    assert phase_timings(stock) == [(0.4, 0.05), (0.3, 0.06), (0.5, 0.04)] and phase_timings(routing) == []
    assert phase_floors([[stock, routing], [batch]]) == (pytest.approx(0.4), pytest.approx(4 * 0.05))
    # a second configuration whose median first token is sooner and whose later tokens are slower
    resident = {"requests": 1, "generated_tokens": 5, "ttft_s": 0.2, "tpot_s": 0.07, "round_ttft_s": [0.1, 0.9],
                "round_tpot_s": [0.08, 0.09]}
    assert phase_floors([[stock, routing], [resident]]) == (pytest.approx(0.2), pytest.approx(4 * 0.05))
    assert phase_floors([[routing], [batch]]) is None


def test_compute_floor_is_the_lowest_median_of_the_all_resident_engines():
    # stock: one lucky timing among slow ones; the median is what a run's time is compared with
    assert resident_floor_s([[0.68, 1.0, 0.96, 1.14, 0.86]]) == pytest.approx(0.96)
    # an all-resident plugin run with a lower median sets the floor; an empty group (a killed run) counts for none
    assert resident_floor_s([[0.68, 1.0, 0.96, 1.14, 0.86], [0.9, 0.92], []]) == pytest.approx(0.91)


def test_achieved_rate_per_workload():
    # bytes over the I/O threads' summed read time, times the threads; too few loads give no rate
    run = {"workloads": {
        "decode": {"offload": {"loads": 20, "bytes_read": 4e9, "read_s": 2.0}},
        "prefill": {"offload": {"loads": MIN_LOADS_FOR_RATE - 1, "bytes_read": 9e9, "read_s": 1.0}},
        "batch": {"offload": {"loads": 30, "bytes_read": 3e9, "read_s": 0.0}},  # recorded before read_s
        "stock": {"offload": None},
    }}
    assert achieved_gbps(run, 1) == {"decode": pytest.approx(2.0)}
    assert achieved_gbps(run, 2) == {"decode": pytest.approx(4.0)}
    assert achieved_gbps({"workloads": {}}, 1) == {}


def test_a_packed_runs_experts_weigh_what_its_loads_read():
    """A packed store's blocks vary in length: its I/O floor counts the bytes its loads read per expert."""
    run = {"workloads": {
        "decode": {"offload": {"loads": 10, "bytes_read": 10 * 2_400_000}},
        "prefill": {"offload": {"loads": 30, "bytes_read": 30 * 2_360_000}},
        "stock": {"offload": None},
    }}
    assert stored_expert_bytes(run) == 2_370_000
    assert stored_expert_bytes({"workloads": {"decode": {"offload": {"loads": 0, "bytes_read": 0}}}}) is None


def test_a_runs_time_is_the_median_of_its_rounds():
    assert timings({}) == [] and timings({"wall_s": 0.3}) == [0.3]
    assert median_time_s({"wall_s": 0.3}) == 0.3
    # bench --rounds 3: the first timing was disturbed; the median ignores it
    assert median_time_s({"wall_s": 0.9, "round_wall_s": [0.31, 0.3]}) == pytest.approx(0.31)
    assert median_time_s({"wall_s": 0.4, "round_wall_s": [0.2]}) == pytest.approx(0.3)


def test_rounds_below_one_are_refused(tmp_path, capsys):
    assert main(["bench", str(TINY_PYMOE), "--quick", "--rounds", "0", "--out", str(tmp_path / "out")]) == 2
    assert "--rounds 0: give 1 or more timings per workload" in capsys.readouterr().out
    assert main(["bench", str(TINY_PYMOE), "--quick", "--repeats", "0", "--out", str(tmp_path / "out")]) == 2
    assert "--repeats 0: give 1 or more engine starts per run" in capsys.readouterr().out


def test_repeated_engines_pool_their_timings_and_keep_each_engines():
    first = {"name": "lru 25%", "workloads": {"decode": {"wall_s": 1.0, "round_wall_s": [1.2]}, "batch": {"wall_s": 5.0}}}
    stock = {"name": "stock", "workloads": {"decode": {"wall_s": 0.5}}}
    again = {"name": "lru 25%", "workloads": {"decode": {"wall_s": 2.0, "round_wall_s": [2.2]}, "batch": {"wall_s": 4.0}}}
    third = {"name": "lru 25%", "workloads": {"decode": {"wall_s": 1.4, "round_wall_s": [1.6]}}}  # batch lost
    merged = merge_repeats([first, stock, again, {"name": "stock", "workloads": {"decode": {"wall_s": 0.6}}}, third])
    assert [r["name"] for r in merged] == ["lru 25%", "stock"] and merged[0]["engines"] == 3
    decode = merged[0]["workloads"]["decode"]
    assert decode["engine_wall_s"] == [[1.0, 1.2], [2.0, 2.2], [1.4, 1.6]]
    assert timings(decode) == [1.0, 1.2, 2.0, 2.2, 1.4, 1.6] and median_time_s(decode) == pytest.approx(1.5)
    assert merged[0]["workloads"]["batch"]["engine_wall_s"] == [[5.0], [4.0], []]
    assert timings(merged[1]["workloads"]["decode"]) == [0.5, 0.6]
    # TTFT and TPOT of the later engines join the first's, for the causal floor
    later = {"wall_s": 0.9, "ttft_s": 0.1, "tpot_s": 0.02, "round_wall_s": [0.8], "round_ttft_s": [0.3],
             "round_tpot_s": [0.03]}
    timed = [{"name": "s", "workloads": {"decode": {"wall_s": 1.0, "ttft_s": 0.2, "tpot_s": 0.01}}},
             {"name": "s", "workloads": {"decode": later}}]
    [one] = merge_repeats(timed)
    assert phase_timings(one["workloads"]["decode"]) == [(0.2, 0.01), (0.1, 0.02), (0.3, 0.03)]
    # under a memory limit: every ending, and the highest peak
    limited = [{"name": "s", "workloads": {}, "ended": "ran", "peak_memory_bytes": 5},
               {"name": "s", "workloads": {}, "ended": "OOM-killed (1 kill(s), exit code -9)", "peak_memory_bytes": 7}]
    [one] = merge_repeats(limited)
    assert one["engine_endings"] == ["ran", "OOM-killed (1 kill(s), exit code -9)"] and one["peak_memory_bytes"] == 7


def _write_experts(folder, num_experts: int = 4, shape: tuple[int, int] = (64, 512)) -> int:
    """A safetensors file of one layer's experts (bf16); the bytes of one expert."""
    import torch
    from safetensors.torch import save_file

    tensors = {f"model.layers.0.block_sparse_moe.experts.{e}.{proj}.weight": torch.randn(shape).bfloat16()
               for e in range(num_experts) for proj in ("w1", "w2", "w3")}
    tensors["model.embed_tokens.weight"] = torch.randn(8, 64).bfloat16()
    save_file(tensors, str(folder / "model.safetensors"))
    return 3 * shape[0] * shape[1] * 2


@pytest.mark.parametrize("io_threads", [1, 2])
def test_bandwidth_probe_reads_experts_with_direct_io(tmp_path, io_threads):
    from vllm_moe_offload.cli.bench_run import resident_pages
    from vllm_moe_offload.runtime.safetensors_io import CheckpointIndex

    expert_bytes = _write_experts(tmp_path)
    path = tmp_path / "model.safetensors"
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
    except OSError as exc:
        pytest.skip(f"the temporary folder's filesystem refuses O_DIRECT: {exc}")
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # out of the page cache: a buffered read would bring it back
    os.close(fd)
    CheckpointIndex(tmp_path)  # reads the header through the page cache, as the probe's own index does
    before = resident_pages(str(path))
    got = read_bandwidth(str(tmp_path), io_threads=io_threads, duration_s=0.2)
    assert got["direct_io"] and got["io_threads"] == io_threads
    assert got["reads"] > 0 and got["payload_bytes"] == got["reads"] * expert_bytes
    assert got["gbps"] > 0 and got["gbps"] == pytest.approx(got["payload_bytes"] / got["seconds"] / 1e9)
    assert not before.all() and (resident_pages(str(path)) == before).all()  # every read bypassed the page cache


def test_bandwidth_probe_follows_the_emulated_link(tmp_path):
    expert_bytes = _write_experts(tmp_path)
    got = read_bandwidth(str(tmp_path), duration_s=0.2, link_gbps=0.01)  # 10 MB/s: ~20 ms per 196 KB expert
    assert "EMULATED" in got["link"]
    assert got["gbps"] <= 0.01 * 1.02
    assert got["ms_per_read"] >= 0.98 * 1e3 * expert_bytes / 0.01e9


@pytest.mark.engine
class TestBenchQuick:
    """``bench --quick --rounds 2 --repeats 2`` end to end on the trained tiny-pymoe (no timing assertions): its
    files, tokens and budgets, the page cache, and every plugin run's bound. One bench run for all of them."""

    @pytest.fixture(scope="class")
    def bench(self, tmp_path_factory):
        out = tmp_path_factory.mktemp("bench-bound")
        rc = main([
            "bench", str(TINY_PYMOE), "--quick", "--policies", "ondemand,lru", "--budgets", "25%,50%",
            "--tokens", str(TINY_PYMOE / "heldout-tokens.npy"), "--no-drop-cache", "--rounds", "2", "--repeats", "2", "--out", str(out),
        ])
        assert rc == 0
        return out, json.loads((out / "bench.json").read_text())

    def test_every_plugin_run_has_its_bound(self, bench):
        out, report = bench
        assert [r["name"] for r in report["runs"]] == ["stock", "ondemand 100%", "ondemand 25%", "lru 25%",
                                                       "ondemand 50%", "lru 50%"]
        assert all(report["bound"]["routing_tokens_match_stock"].values())
        assert report["bound"]["bandwidth"] and all(p["gbps"] > 0 for p in report["bound"]["bandwidth"])
        # one read path (every run reads the checkpoint with one I/O thread): its rate is the probe's or the
        # fastest a workload's loads achieved, whichever is faster, so no run's reads outran the bound's rate
        [path] = report["bound"]["bandwidth"]
        rates = {(r["name"], w): g for r in report["runs"][1:] for w, g in achieved_gbps(r, 1).items()}
        assert rates, "no workload loaded enough experts to measure its rate"
        assert path["achieved_gbps"] == max(rates.values()) and path["achieved_by"] in {f"{n}, {w}" for n, w in rates}
        assert path["used_gbps"] == max(path["gbps"], path["achieved_gbps"])
        stock = report["runs"][0]
        for run in report["runs"][1:]:
            for workload in ("decode", "prefill", "batch"):
                b = run["bound"][workload]
                samples = report["bound"]["stock_wall_s"][workload]
                # the timed engines' 2 rounds each (2 engines), then the routing engine's 5
                assert len(samples) == 9 and samples[:4] == timings(stock["workloads"][workload])
                # ondemand 100% holds every expert: its times are a compute floor as much as stock's
                resident = report["bound"]["resident_wall_s"][workload]
                assert resident == timings(report["runs"][1]["workloads"][workload]) and len(resident) == 4
                # the floor takes the statistic a run's time takes: the lower median of stock's and of ondemand
                # 100%'s; the fastest single timing is kept beside it
                assert b["compute_floor_s"] == pytest.approx(min(np.median(samples), np.median(resident)))
                assert b["fastest_resident_s"] == min(samples + resident) <= b["compute_floor_s"]
                # the run's time: the median of its four timings, two from each engine
                per_engine = run["workloads"][workload]["engine_wall_s"]
                assert run["engines"] == 2 and [len(t) for t in per_engine] == [2, 2]
                assert timings(run["workloads"][workload]) == per_engine[0] + per_engine[1]
                assert b["time_s"] == pytest.approx(median_time_s(run["workloads"][workload]))
                assert b["engine_fractions"] == pytest.approx([b["bound_s"] / median_time_s({"round_wall_s": t})
                                                               for t in per_engine])
                assert b["bound_s"] == max(b["compute_floor_s"], b["io_floor_s"])
                assert b["io_floor_s"] == pytest.approx(b["bytes"] / (path["used_gbps"] * 1e9))
                # a fraction is a timing: only its sign is checked here (speed is shown by the bench itself)
                assert b["fraction"] > 0, (run["name"], workload, b)
                # the optimal cache never loads more than the policy did
                assert b["loads"] <= run["workloads"][workload]["offload"]["loads"], (run["name"], workload)
                if workload != "decode":
                    assert "causal_floor_s" not in b  # several requests, or one step: no phases to chain
                    continue
                # batch-1 decode: the prompt's step alone needs no more loads than the whole workload, its
                # phases' floors are no slower than an all-resident engine's medians, and a perfect run scores
                # bound / floor
                assert 0 <= b["first_step_loads"] <= b["loads"]
                stock_phases = phase_timings(stock["workloads"]["decode"])
                assert len(stock_phases) == 4  # 2 engines x 2 rounds
                generated = stock["workloads"]["decode"]["generated_tokens"]
                # no slower than the median of one all-resident engine's (ondemand 100%)
                full_phases = phase_timings(report["runs"][1]["workloads"]["decode"])
                assert 0 < b["first_token_floor_s"] <= np.median([t for t, _ in full_phases]) + 1e-12
                assert 0 < b["after_first_floor_s"] <= np.median([t for _, t in full_phases]) * (generated - 1) + 1e-12
                assert b["causal_floor_s"] == pytest.approx(causal_floor_s(
                    b["first_step_loads"], run["offload"]["expert_bytes"], path["used_gbps"],
                    b["first_token_floor_s"], b["after_first_floor_s"]))
                assert b["best_fraction"] == pytest.approx(min(1.0, b["bound_s"] / b["causal_floor_s"]))
        full = report["runs"][1]["bound"]
        assert all(full[w]["loads"] == 0 and full[w]["limited_by"] == "compute" for w in ("decode", "prefill", "batch"))
        quarter, half = report["runs"][2]["bound"], report["runs"][4]["bound"]
        assert all(quarter[w]["loads"] >= half[w]["loads"] > 0 for w in ("decode", "prefill", "batch"))

    def test_table_and_plot(self, bench):
        out, report = bench
        md = (out / "bench.md").read_text()
        section = md.split("## Fraction of the physical bound")[1].split("\n## ")[0]
        rows = [line for line in section.splitlines() if line.startswith("| decode |")]
        assert [row.split(" | ")[1] for row in rows] == ["100%", "25%", "50%"]
        assert "| ondemand | lru |" in section
        assert "the median of 9 stock timings of it (the timed 2 engines' 2 round(s) each" in section
        assert "or of a plugin run holding every expert in a slot (4 timing(s);" in section
        # the compute floor's cell: the floor, the fastest single all-resident timing in brackets
        assert all(re.match(r"[\d.]+ \([\d.]+\)$", row.split(" | ")[3]) for row in rows), rows
        assert "(the median of its 4 timings, `--rounds` x `--repeats`)" in section
        assert "in brackets the lowest and highest of its 2 engines' own fractions" in section
        lru = next(line for line in rows if line.split(" | ")[1] == "25%").split(" | ")[-1]
        assert re.match(r"\d\.\d\d \(\d\.\d\d-\d\.\d\d\)", lru), lru
        assert "GB/s** (probe " in section and "runs' best" in section
        # the causal floor: measured for batch-1 decode only
        assert "| bound ms | causal floor ms | ondemand | lru |" in section
        assert all(re.search(r"\| [\d.]+ \(best \d\.\d\d\) \|", row) for row in rows), rows
        assert all(row.split(" | ")[6] == "-" for row in section.splitlines() if row.startswith("| prefill |"))
        assert (out / "bench-bound.png").read_bytes()[:8] == PNG_MAGIC

    def test_runs_and_files(self, bench):
        out, report = bench
        for name in ("bench.md", "bench-speed.png", "bench-cache.png", "bench.log"):
            assert (out / name).exists()
        for name in ("bench-speed.png", "bench-cache.png"):
            assert (out / name).read_bytes()[:8] == PNG_MAGIC
        md = (out / "bench.md").read_text()
        assert "shared development machine" in md and "| lru 25% |" in md and "(x" in md

    def test_offload_runs_match_stock_and_respect_the_budget(self, bench):
        _, report = bench
        for run in report["runs"][1:]:
            assert run["offload"]["slot_bytes"] <= run["offload"]["budget_bytes"]
            for name, workload in run["workloads"].items():
                assert workload["tokens_match_stock"], (run["name"], name)
                assert workload["generated_tokens"] > 0 and workload["wall_s"] > 0
        full = report["runs"][1]["offload_total"]
        assert full["misses"] == 0 and full["hit_rate"] == 1.0
        for run in report["runs"][2:]:
            assert run["offload_total"]["misses"] > 0
            assert sum(run["offload_total"]["bytes_read"].values()) > 0
            assert run["workloads"]["decode"]["offload"]["demand_hit_rate"] < 1.0
        for ondemand, lru in ((report["runs"][2], report["runs"][3]), (report["runs"][4], report["runs"][5])):
            assert ondemand["offload_total"]["loads"] > lru["offload_total"]["loads"]

    def test_page_cache_is_measured(self, bench):
        _, report = bench
        for run in report["runs"]:
            assert run["page_cache_after"]["expert_bytes"] > 0
            assert "drop_cache_error" not in run  # --no-drop-cache

    def test_rebuild_keeps_the_bound(self, bench):
        out, report = bench
        (out / "bench.md").unlink()
        assert main(["bench", str(TINY_PYMOE), "--rebuild", "--out", str(out)]) == 0
        assert "## Fraction of the physical bound" in (out / "bench.md").read_text()
        assert json.loads((out / "bench.json").read_text())["bound"] == report["bound"]


def test_the_floors_stock_timings_say_where_they_come_from():
    from vllm_moe_offload.cli.bench_report import _stock_timings_text
    ran = {"runs": [{"kind": "stock", "workloads": {"decode": {"wall_s": 1.0, "round_wall_s": [1.1]}}}],
           "rounds": 2, "repeats": 1}
    assert _stock_timings_text(ran) == ("the timed engine's 2 rounds and the rounds of the stock engine that "
                                        "recorded the routing)")
    # under --memory-limit stock may not finish: its timings are then the routing engine's alone, run unlimited
    killed = {"runs": [{"kind": "stock", "workloads": {}}], "rounds": 3, "repeats": 1, "memory_limit_bytes": 2**30}
    assert _stock_timings_text(killed) == ("the rounds of the stock engine that recorded the routing, which ran "
                                           "without the memory limit; the timed stock engine did not finish)")
