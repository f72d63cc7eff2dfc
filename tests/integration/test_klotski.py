"""Klotski inside vLLM: grouped steps, whole-layer prefetch, plain order, deeper prefetch; tokens stay stock's.

Random tiny Mixtral (correctness only). The engine's token budget is cut to 48
tokens so that the prompts below need several chunked-prefill steps in stock
vLLM; with ``groups`` the plugin's scheduler lets a step take up to
``klotski_max_group`` times that while loads dominate.

Prefetch depth: a 4-layer copy of the random tiny Mixtral, with an EMULATED
link latency so that one expert's load outlasts the time between two MoE
layers (well under 1 ms here), as on real hardware; with three I/O threads
the planner prefetches hot experts more than one layer ahead, with one it
stays at one layer (capped by the lanes, as Fate's look-ahead).
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import engine_env, run_engines
from vllm_moe_offload.cli.tiny_models import make_tiny_model

pytestmark = pytest.mark.engine

#: small token budget per step, so that prompts are chunked (stock) or grouped (klotski groups)
ENGINE = {"max_num_batched_tokens": 48, "max_num_seqs": 8}


def _prompts() -> list[list[int]]:
    rng = random.Random(5)
    return [[1] + [rng.randrange(32, 127) for _ in range(rng.randrange(20, 60))] for _ in range(6)]


def _job(name, model, stock=False, **settings):
    engine = dict(ENGINE)
    if not stock:
        engine["additional_config"] = {"moe_offload": {"policy": "klotski", "budget": "50%", **settings}}
    return {"name": name, "model": str(model), "engine": engine, "prompts": _prompts(), "max_tokens": 12}


@pytest.fixture(scope="module")
def results(tiny_models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("klotski")
    model = tiny_models["mixtral"]
    stock = run_engines(tmp / "stock", [_job("stock", model, stock=True)], stock=True)
    offload = run_engines(tmp / "offload", [
        _job("all", model),
        _job("none", model, klotski_features="none"),
        _job("hot,reorder", model, klotski_features="hot,reorder"),
        _job("groups x2", model, klotski_features="groups", klotski_max_group=2),
    ], stock=False)
    return stock["stock"], offload


@pytest.mark.parametrize("name", ["all", "none", "hot,reorder", "groups x2"])
def test_every_ablation_row_gives_stocks_tokens(results, name):
    stock, offload = results
    assert "error" not in offload[name], offload[name].get("error")
    assert offload[name]["tokens"] == stock["tokens"]


def test_groups_widen_steps_and_the_others_leave_them_alone(results):
    _, offload = results
    assert all(r["stats"] for r in offload.values()), [r.get("stats_error") for r in offload.values()]
    klotski = {name: r["stats"][0]["klotski"] for name, r in offload.items()}
    assert klotski["all"]["features"] == ["groups", "hot", "reorder"]
    assert klotski["none"]["features"] == []
    # 6 prompts of 20-60 tokens: more than one 48-token step, so a widened step takes more than 48
    assert klotski["all"]["grouped_steps"] >= 1
    assert klotski["groups x2"]["grouped_steps"] >= 1
    assert "grouped_steps" not in klotski["hot,reorder"]  # vLLM's own scheduler ran
    assert "grouped_steps" not in klotski["none"]
    # with groups, fewer steps read the experts of the prompts than with vLLM's 48-token steps
    assert klotski["all"]["steps"] < offload["hot,reorder"]["stats"][0]["layers"][0]["steps"]


#: EMULATED per-load latency: far above the tiny model's time per layer, which is under 1 ms alone
#: but measured 15-35 ms while other engines shared the 2-core machine (3 and 20 ms were not enough:
#: then the planner rightly found the on-demand loads hidden and prefetched nothing deeper)
LINK_LATENCY_MS = 100.0


def _depth_job(name, model, stock=False, **settings):
    engine = {}
    if not stock:
        engine["additional_config"] = {"moe_offload": {
            "policy": "klotski", "budget": "75%", "link_latency_ms": LINK_LATENCY_MS, **settings,
        }}
    # a batch of requests, then batch-1 decode (room in the slots for prefetches)
    rounds = [{"prompts": _prompts()[:3]}, {"prompts": _prompts()[:1], "max_tokens": 16}]
    return {"name": name, "model": str(model), "engine": engine, "rounds": rounds, "max_tokens": 6}


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory):
    """The random tiny Mixtral with 4 layers: 3 MoE layers after the first to prefetch for."""
    return make_tiny_model("mixtral", tmp_path_factory.mktemp("mixtral-4-layers"), num_hidden_layers=4)


@pytest.fixture(scope="module")
def deep(four_layers, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("klotski-depth")
    model = four_layers
    stock = run_engines(tmp / "stock", [_depth_job("stock", model, stock=True)], stock=True)
    offload = run_engines(tmp / "offload", [
        _depth_job("3 lanes", model, io_threads=3),
        _depth_job("1 lane", model, io_threads=1),
        _depth_job("1 lane, no gate", model, io_threads=1, prefetch_gate=False),
    ], stock=False)
    return stock["stock"], offload


@pytest.mark.parametrize("name", ["3 lanes", "1 lane", "1 lane, no gate"])
def test_deeper_prefetch_gives_stocks_tokens(deep, name):
    stock, offload = deep
    assert "error" not in offload[name], offload[name].get("error")
    assert [r["tokens"] for r in offload[name]["rounds"]] == [r["tokens"] for r in stock["rounds"]]


def test_planner_prefetches_deeper_when_loads_outlast_the_layers_in_between(deep):
    _, offload = deep
    klotski = {name: r["stats"][0]["klotski"] for name, r in offload.items()}
    total = {name: r["stats"][0]["total"] for name, r in offload.items()}
    print("klotski depth: depth_steps", {n: k["depth_steps"] for n, k in klotski.items()},
          "distance_needed", {n: t["distance_needed"] for n, t in total.items()})
    assert klotski["3 lanes"]["max_depth"] == 3  # 3 lanes, 3 layers after the first
    assert klotski["1 lane"]["max_depth"] == 1
    # JSON made the depth keys strings; loads of 100 ms against far less compute: deeper than 1
    assert max(int(d) for d in klotski["3 lanes"]["depth_steps"]) > 1
    assert set(klotski["1 lane"]["depth_steps"]) == {"1"}
    # predictions really went out 2 layers ahead (scored against what the layer then needed)
    assert "2" in total["3 lanes"]["distance_needed"] and set(total["1 lane"]["distance_needed"]) == {"1"}
    assert "depth" in klotski["3 lanes"]["plan"]["describe"]
    # planned at a step's first layer when its size changed, or every REPLAN_EVERY_STEPS steps: not at every step
    steps = sum(klotski["3 lanes"]["depth_steps"].values())
    assert 1 <= klotski["3 lanes"]["replans"] < steps, (klotski["3 lanes"]["replans"], steps)
    assert klotski["3 lanes"]["moe_layer_ms"]["steps"] >= 1  # warm-up steps left out, the rest fitted


def test_hot_expert_prefetches_load_only_where_they_have_paid_unless_the_gate_is_off(deep):
    _, offload = deep
    total = {name: r["stats"][0]["total"] for name, r in offload.items()}
    print("klotski gate:", {n: (t["prefetch_loads"], t["prefetch_gated"]) for n, t in total.items()})
    # 100 ms loads against layers of well under that: a wrong guess costs far more than a right one can save,
    # so the random model's guesses close the gate once both times are measured; off, none is held back
    assert total["1 lane"]["prefetch_gated"] > 0 and total["3 lanes"]["prefetch_gated"] > 0
    assert total["1 lane, no gate"]["prefetch_gated"] == 0 and total["1 lane, no gate"]["prefetch_loads"] > 0


#: klotski_hold_ms in the test: far above an empty step's turn, so that the bound is measurable
HOLD_MS = 40.0


def _arrivals(tmp: Path, model: Path, stock: bool) -> dict:
    """One request decodes; three more arrive one by one (during holds with klotski; see klotski_arrivals.py)."""
    rng = random.Random(11)
    engine = {"max_num_seqs": 8}
    if not stock:
        engine["additional_config"] = {"moe_offload": {
            "policy": "klotski", "budget": "75%", "link_latency_ms": LINK_LATENCY_MS, "io_threads": 3,
            "klotski_hold_ms": HOLD_MS,
        }}
    job = {
        "model": str(model), "engine": engine, "stock": stock, "after_tokens": 4, "max_tokens": 16,
        "first": [1] + [rng.randrange(32, 127) for _ in range(30)],
        "later": [[1] + [rng.randrange(32, 127) for _ in range(rng.randrange(5, 20))] for _ in range(3)],
    }
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "job.json").write_text(json.dumps(job))
    with open(tmp / "log.txt", "w") as log:
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).with_name("klotski_arrivals.py")), str(tmp / "job.json"),
             str(tmp / "out.json")], env=engine_env(tmp, stock), stdout=log, stderr=subprocess.STDOUT,
            timeout=600, cwd=tmp,
        )
    assert proc.returncode == 0, (tmp / "log.txt").read_text()[-6000:]
    return json.loads((tmp / "out.json").read_text())


@pytest.fixture(scope="module")
def arrivals(four_layers, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("klotski-arrivals")
    model = four_layers
    return _arrivals(tmp / "stock", model, stock=True), _arrivals(tmp / "klotski", model, stock=False)


def test_requests_arriving_during_a_held_decode_step_join_it_with_stocks_tokens(arrivals):
    stock, klotski = arrivals
    assert klotski["tokens"] == stock["tokens"]
    held = klotski["stats"][0]["klotski"]
    print("klotski held steps:", {k: held[k] for k in ("held_steps", "holds_joined", "hold_ms_max", "steps")},
          "TTFT s stock", stock["ttft_s"], "klotski", klotski["ttft_s"])
    # each later request was added at an empty (held) step and ended that hold: it joined the step
    assert held["holds_joined"] >= 3 and held["held_steps"] >= held["holds_joined"]
    # the bound: klotski_hold_ms (or one step's planned loads, if fewer), plus one empty step's turn
    # (1 ms of sleep and the engine's bookkeeping). The turn's slack is for a loaded machine: 106 ms was
    # seen with two test workers and other work running (load average 12 on 2 cores)
    assert 0 < held["hold_ms_max"] <= HOLD_MS + 100.0
