"""Fate inside vLLM: prefetch into the shared pool, look-ahead deeper than one layer.

Tokens must stay stock vLLM's. The random tiny Mixtral checks correctness with a
batch of requests; the trained tiny-pymoe (learned routing) gives the
prediction figures. Both run with an EMULATED link latency so that one expert's
load outlasts a layer's compute, as on real hardware, and with three I/O threads,
so that several loads can be in flight: then the look-ahead goes deeper than one
layer (with one thread it stays at one).
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from tests.conftest import TINY_PYMOE, run_engines
from vllm_moe_offload.core.config import Budget, OffloadConfig, Tier
from vllm_moe_offload.core.correlation import CorrelationTable, load_profile
from vllm_moe_offload.core.plan import plan_slots
from vllm_moe_offload.core.resident import choose_resident_layers, layer_demand
from vllm_moe_offload.integration.setup import _resident_layers

#: EMULATED per-load latency: far above a tiny layer's compute (well under 1 ms here)
LINK_LATENCY_MS = 3.0
#: loads in flight at once: look-ahead deeper than one layer needs more than one lane
IO_THREADS = 3
_config = json.loads((TINY_PYMOE / "config.json").read_text())
#: MoE layers, experts per layer, top_k of the trained model
TINY_PYMOE_SHAPE = (_config["num_hidden_layers"], _config["num_local_experts"], _config["num_experts_per_tok"])


def _random_prompts() -> list[list[int]]:
    rng = random.Random(7)
    return [[1] + [rng.randrange(32, 127) for _ in range(rng.randrange(8, 40))] for _ in range(4)]


def _trained_rounds() -> list[dict]:
    """Batch-1 decode of held-out text: one request per round."""
    tokens = np.load(TINY_PYMOE / "heldout-tokens.npy")
    return [{"prompts": [[1] + tokens[start:start + 24].tolist()]} for start in (0, 5000, 20000)]


def _job(name, model, offload=None, **job):
    """A fate run; its prefetch gate off unless ``offload`` turns it on: whether the gate loads a prediction
    depends on measured times, and these tests look at what fate predicts and prefetches as the paper does.
    The next-layer fill is off: it would take the random model's batched steps from fate's routers
    (``tests/integration/test_layer_ahead.py`` runs fate with it)."""
    engine = {}
    if offload is not None:
        engine["additional_config"] = {"moe_offload": {"policy": "fate", "link_latency_ms": LINK_LATENCY_MS,
                                                       "io_threads": IO_THREADS, "prefetch_gate": False,
                                                       "layer_ahead": False, **offload}}
    return {"name": name, "model": str(model), "engine": engine, "max_tokens": 24, **job}


@pytest.fixture(scope="module")
def results(tiny_models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fate")
    random_model = tiny_models["mixtral"]
    stock = run_engines(tmp / "stock", [
        _job("random", random_model, prompts=_random_prompts()),
        _job("trained", TINY_PYMOE, rounds=_trained_rounds()),
    ], stock=True)
    profile = tmp / "profile.npz"
    offload = run_engines(tmp / "offload", [
        # the prefetch gate on, as by default (core/prefetch_gate.py)
        _job("random 25%", random_model, {"budget": "25%", "prefetch_gate": True}, prompts=_random_prompts()),
        _job("random 25% ungated", random_model, {"budget": "25%"}, prompts=_random_prompts()),
        # layer 0 kept whole, as asked: the restart from its profile below chooses for itself
        _job("trained 50%", TINY_PYMOE, {"budget": "50%", "resident_layers": 1, "save_profile": str(profile)},
             rounds=_trained_rounds()),
    ], stock=False)
    # a restart from the saved profile chooses its resident layers from the recall measured above
    offload.update(run_engines(tmp / "profiled", [
        _job("trained 50% profiled", TINY_PYMOE, {"budget": "50%", "profile": str(profile)},
             rounds=_trained_rounds()),
    ], stock=False))
    return stock, offload, profile


@pytest.mark.engine
@pytest.mark.parametrize("name", ["random 25%", "random 25% ungated", "trained 50%", "trained 50% profiled"])
def test_tokens_are_stocks(results, name):
    stock, offload, _ = results
    assert "error" not in offload[name], offload[name].get("error")
    reference = stock[name.split()[0]]
    assert [r["tokens"] for r in offload[name]["rounds"]] == [r["tokens"] for r in reference["rounds"]]


def _total(result) -> dict:
    return result["stats"][0]["total"]


@pytest.mark.engine
def test_look_ahead_goes_deeper_when_loads_outlast_compute(results):
    _, offload, _ = results
    # JSON made the distance keys strings; distance 1 always, farther once loads are timed
    # (the random tiny model has 2 layers: only 1 layer ahead exists)
    for name, distances in (("random 25% ungated", {"1"}), ("trained 50%", {"1", "2", "3"})):
        total = _total(offload[name])
        assert set(total["distance_needed"]) == distances, (name, total["distance_needed"])
        assert total["prefetch_hits"] > 0


@pytest.mark.engine
def test_the_gate_is_on_by_default_and_can_be_switched_off(results):
    """With the gate (the default) every prediction is still made or sampled and scored; switched off, none is
    held back. Whether the gate holds one back depends on measured times, so which ones it held is checked
    on a slot pool with set times (tests/runtime/test_slots_prefetch.py)."""
    _, offload, _ = results
    gated, ungated = _total(offload["random 25%"]), _total(offload["random 25% ungated"])
    assert ungated["prefetch_gated"] == 0 and ungated["prefetch_loads"] > 0
    assert sum(gated["distance_predicted"].values()) > 0


@pytest.mark.engine
def test_prediction_recall_falls_with_distance_on_the_trained_model(results):
    _, offload, _ = results
    total = _total(offload["trained 50%"])
    recall = {int(d): r for d, r in total["recall_by_distance"].items()}
    needed = {int(d): n for d, n in total["distance_needed"].items()}
    print("trained tiny-pymoe, fate 50%: recall by look-ahead distance", recall, "over needs", needed)
    # tiny-pymoe measured 0.77 one layer ahead, 0.73 two, 0.64 three; Fate reports about 0.79 on Mixtral
    assert recall[1] > 0.7
    # how far fate looks depends on measured load and compute times: on a loaded machine few layers were
    # predicted 3 ahead (once recall 1.0 over a handful of needs, and 0.82 two ahead against 0.81 one
    # ahead), so three layers ahead is compared only over enough needs
    if needed.get(3, 0) >= 100:
        assert recall[1] > recall[3]


@pytest.mark.engine
def test_prefetches_load_into_the_shared_pool_and_each_ends_once(results):
    # The shared pool (the default here) lets a prefetch evict what is expected to be used after the
    # prefetched expert (the rule itself: tests/core/test_shared_pool.py; the per-layer pools' "useful"
    # rule: tests/runtime/test_slots_prefetch.py). At 25% every slot is taken: the guesses load by eviction,
    # and each load ends as a hit, as unused, or is still resident at the end, never two of these.
    _, offload, _ = results
    total = _total(offload["random 25% ungated"])
    assert offload["random 25% ungated"]["stats"][0]["pool"] == "shared"
    assert total["prefetch_loads"] > 0 and total["prefetch_hits"] > 0
    assert total["prefetch_hits"] + total["prefetch_unused"] <= total["prefetch_loads"]


@pytest.mark.engine
def test_resident_layers_follow_the_loads_the_saved_profile_predicts(results):
    _, offload, profile = results
    table = load_profile(profile)
    recall = table.prediction_recall
    assert np.isnan(recall[0]) and not np.isnan(recall[1:]).any()  # layer 0 resident, never predicted
    print("trained tiny-pymoe, fate 50%: saved recall by layer", recall.round(3).tolist())
    before = offload["trained 50%"]["stats"][0]["layer_slots"]
    after = offload["trained 50% profiled"]["stats"][0]["layer_slots"]
    num_layers, num_experts, top_k = TINY_PYMOE_SHAPE
    assert before[0] == num_experts and before[1] < num_experts  # asked: layer 0 only
    # the same rule over the saved counts, with the 50% budget split as the engine splits it (staging aside)
    layer_slots = _split(Budget.parse("50%"), num_layers, num_experts, top_k)
    choice = choose_resident_layers(layer_demand(table.counts, table.top_k), layer_slots, min_resident=0)
    print("trained tiny-pymoe, fate 50%: expected loads per token by resident layers", choice.describe())
    resident = next(i for i, n in enumerate(after) if n < num_experts)
    # on this model every resident layer costs the others more hits than it saves (measured on its saved
    # profile: 1.40 expected loads per token with no layer resident, 2.65 with layer 0, 3.61 with layers 0-1)
    assert resident == choice.resident_layers == 0


def _split(budget, num_layers, num_experts, top_k, min_rest=None):
    if min_rest is None:
        min_rest = 2 * top_k  # as the engine's automatic choice
    return lambda r: plan_slots(budget, num_layers, num_experts, top_k, 1, resident_layers=r,
                                min_rest_slots=min_rest).layer_slots


def test_resident_layer_rule_without_engine(tmp_path):
    table = CorrelationTable(4, 8, 2)
    rng = np.random.default_rng(0)
    for _ in range(200):  # layer 1 spreads over all 8 experts; layers 2 and 3 use two each
        table.observe_tokens(np.array([[[0, 1], sorted(rng.choice(8, 2, replace=False)), [2, 3], [4, 5]]]))
    table.note_recall([None, 0.5, 0.9, 0.9])
    table.save(tmp_path / "p.npz")
    profile = load_profile(tmp_path / "p.npz")
    config = OffloadConfig.from_dict({"policy": "fate", "budget": "62.5%", "profile": str(tmp_path / "p.npz")})
    roomy = _split(Budget.parse("62.5%"), 4, 8, 2, min_rest=2)  # 20 slots: 2 resident layers leave 2 each
    assert _resident_layers(config, profile, lambda resident_layers: _Plan(roomy(resident_layers)), Tier.DISK) == 2
    tight = _split(Budget.parse("62.5%"), 4, 8, 2, min_rest=4)  # 2 resident layers would leave under 4
    # and layer 0 needs only experts 0 and 1: its 2+ cached slots never miss, keeping it whole wastes 6
    assert _resident_layers(config, profile, lambda resident_layers: _Plan(tight(resident_layers)), Tier.DISK) == 0
    config = OffloadConfig.from_dict({"policy": "fate", "budget": "50%"})
    # no profile: from disk none (a load outlasts a layer's compute: the slots serve more spread out); from
    # host memory layer 0, which nothing predicts, while prefetches hide the other layers' loads
    assert _resident_layers(config, None, None, Tier.DISK) == 0
    assert _resident_layers(config, None, None, Tier.HOST) == 1
    config = OffloadConfig.from_dict({"policy": "fate", "budget": "50%", "resident_layers": 3,
                                     "profile": str(tmp_path / "p.npz")})
    assert _resident_layers(config, profile, None, Tier.DISK) == 3  # an explicit count wins


class _Plan:
    def __init__(self, layer_slots):
        self.layer_slots = layer_slots
