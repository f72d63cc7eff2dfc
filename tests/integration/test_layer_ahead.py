"""Next-layer fill (``integration/layer_ahead.py``): steps of several tokens load the next layer's first experts.

First on two real slot pools over a real checkpoint and one real transfer engine (the link emulated at 5 ms a
load, so that times are known): how many of the next layer's experts load ahead follows the link's idle time
between the two layers as measured, and in which order. Then in real engines on the trained tiny-pymoe
(learned routing, so the precision figure means something): tokens stay stock vLLM's, the predictions are
scored, and the default multiprocess engine runs it as users run it.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from tests.conftest import TINY_PYMOE, offload_total, round_tokens, run_engines
from tests.runtime.test_slots import E, H, I, PREFIX, _identity, _pooled, experts  # noqa: F401 (fixture)
from vllm_moe_offload.core.cache import SlotMap
from vllm_moe_offload.core.replacement import make_policy
from vllm_moe_offload.integration.layer_ahead import PREDICTOR, LayerAhead, step_kind
from vllm_moe_offload.runtime.expert_layout import per_expert_layout
from vllm_moe_offload.runtime.safetensors_io import CheckpointIndex, ThreadLocalReaders
from vllm_moe_offload.runtime.slots import LayerSlots
from vllm_moe_offload.runtime.tiers import DiskSource
from vllm_moe_offload.runtime.transfer import LinkEmulator, ThreadTransferEngine

#: each load takes at least this long (the emulated link)
LOAD_MS = 5.0


class Router(torch.nn.Module):
    """A router that sends row ``i`` to ``rows[i]`` (called as vLLM's gate: ``gate(x) -> (logits, bias)``)."""

    def __init__(self, rows: list[list[int]]) -> None:
        super().__init__()
        logits = torch.zeros(len(rows), E)
        for i, row in enumerate(rows):
            for rank, expert in enumerate(row):
                logits[i, expert] = 10.0 - rank
        self.logits = logits

    def forward(self, x):
        return self.logits[: x.shape[0]], None


class Layer:
    """What LayerAhead reads of an ``OffloadRoutedExperts``: its slots and its top-k."""

    top_k = 2

    def __init__(self, slots: LayerSlots) -> None:
        self.slots = slots


def _slots(folder, engine, num_slots: int, layer_idx: int) -> LayerSlots:
    readers = ThreadLocalReaders(direct_io=True)
    source = DiskSource(CheckpointIndex(folder), per_expert_layout(PREFIX, "w1", "w3", "w2"), _identity, readers)
    slot_map = SlotMap(E, num_slots, make_policy("lru", E, num_slots, top_k=2))
    return LayerSlots(layer_idx, torch.zeros(num_slots, 2 * I, H), torch.zeros(num_slots, H, I), slot_map, source,
                      engine, LinkEmulator(latency_ms=LOAD_MS))


def _pair(folder):
    engine = ThreadTransferEngine(1)
    this, nxt = _slots(folder, engine, 4, 0), _slots(folder, engine, 5, 1)
    # measure the link: one load, waited for
    this.begin_layer()
    this.ensure([5])
    this.end_step()
    return engine, Layer(this), Layer(nxt)


def _next_layer_step(nxt: LayerSlots, needed: list[int]) -> None:
    nxt.begin_layer()
    nxt.ensure(needed)
    nxt.end_step()


def test_as_many_load_ahead_as_the_link_idles_between_the_layers(experts):  # noqa: F811
    folder, _ = experts
    engine, this, nxt = _pair(folder)
    rows = [[0, 1], [0, 2], [3, 0], [1, 2]]
    ahead = LayerAhead(this, nxt, Router(rows), min_tokens=2)
    x = torch.zeros(4, H)
    # no idle time measured yet: one expert, the one that completes the most rows soonest (0: three rows wait)
    this.slots.begin_layer()
    ahead.prefetch(x)
    assert nxt.slots.in_flight(range(E)) == [0]
    this.slots.end_step()
    gap_s = 0.007  # the next layer's planning and the compute between the two: about 1.4 loads
    time.sleep(gap_s)
    _next_layer_step(nxt.slots, [0, 1])  # 0 was loaded ahead; 1 is the first demand load
    # this layer's next step: the link idled about gap_s between the two last time
    ahead.gate = Router([[2, 3], [4, 5], [2, 4], [3, 5]])  # all four missing; 0 and 1 useful (3 slots free)
    this.slots.begin_layer()
    ahead.prefetch(x)
    idle_s = ahead.idle_s[step_kind(4)]
    assert idle_s >= gap_s
    loading = nxt.slots.in_flight(range(E))
    # admitted while the prefetch link time queued before each is under the idle time: two at 5 ms a load in
    # 7 ms (three where the machine stretched the gap past 10 ms; the three free slots bound it)
    assert 2 <= len(loading) <= 3
    this.slots.end_step()
    nxt.slots.finish_loads()
    _next_layer_step(nxt.slots, [2, 3, 4])
    stats = nxt.slots.stats
    assert stats.prefetch_loads == 1 + len(loading)
    # scored: 0 (needed), then the admitted ones, of which 2, 3 and 4 were needed
    assert stats.layer_ahead_predicted == 1 + len(loading)
    assert stats.layer_ahead_right == 1 + len(set(loading) & {2, 3, 4})
    engine.shutdown()


def test_the_free_time_counts_the_layers_compute_after_its_own_loads(experts):  # noqa: F811
    """The link is free from the end of the layer's own loads, not from the layer's end: a layer that computes
    12 ms after its load lets two or three loads of 5 ms go ahead (counted from its end, one)."""
    folder, _ = experts
    engine, this, nxt = _pair(folder)
    ahead = LayerAhead(this, nxt, Router([[0, 4], [4, 0]]), min_tokens=2)
    x = torch.zeros(2, H)
    this.slots.begin_layer()
    this.slots.after_own_loads(lambda: ahead.prefetch(x))
    this.slots.ensure([0])  # its own load, then one of the next layer's two ahead (nothing measured yet)
    time.sleep(0.012)  # the layer computes
    this.slots.end_step()
    _next_layer_step(nxt.slots, [0, 4])  # the other one: its first demand load, right after
    ahead.gate = Router([[1, 2], [3, 1]])  # three missing, three slots free
    this.slots.begin_layer()
    this.slots.after_own_loads(lambda: ahead.prefetch(x))
    this.slots.ensure([0])  # resident: nothing of its own to load
    assert ahead.idle_s[step_kind(2)] >= 0.012
    assert 2 <= len(nxt.slots.in_flight(range(E))) <= 3
    this.slots.end_step()
    nxt.slots.finish_loads()
    engine.shutdown()


def test_resident_experts_load_nothing_ahead(experts):  # noqa: F811
    folder, _ = experts
    engine, this, nxt = _pair(folder)
    ahead = LayerAhead(this, nxt, Router([[4, 5], [4, 1]]), min_tokens=2)
    _next_layer_step(nxt.slots, [4, 5, 1])  # every expert the rows want is resident
    this.slots.begin_layer()
    ahead.prefetch(torch.zeros(2, H))
    assert nxt.slots.in_flight(range(E)) == [] and nxt.slots.stats.prefetch_loads == 0
    this.slots.end_step()
    _next_layer_step(nxt.slots, [4, 5, 1])
    assert nxt.slots.stats.layer_ahead_predicted == 0
    engine.shutdown()


def test_loads_ahead_never_evict_what_the_next_layers_rows_want(experts):  # noqa: F811
    folder, _ = experts
    engine, this, nxt = _pair(folder)
    _next_layer_step(nxt.slots, [0, 1, 2, 3, 4])  # the next layer's five slots full
    for _ in range(2):
        _next_layer_step(nxt.slots, [0])  # 1-4 not used since: the cache would let any of them go
    ahead = LayerAhead(this, nxt, Router([[1, 5], [2, 5]]), min_tokens=2)
    this.slots.begin_layer()
    ahead.prefetch(torch.zeros(2, H))
    assert nxt.slots.in_flight(range(E)) == [5]
    # 5 took the slot of 3 or 4: the rows want 1 and 2, resident, so they stay
    assert nxt.slots.slot_map.slot_of(1) is not None and nxt.slots.slot_map.slot_of(2) is not None
    this.slots.end_step()
    nxt.slots.finish_loads()
    engine.shutdown()


def test_many_rows_order_the_next_layer_by_rows_wanting_each(experts):  # noqa: F811
    folder, _ = experts
    engine, this, nxt = _pair(folder)
    # 100 rows (over the greedy's 64): 3 wanted by 70 rows, 2 by 50, 4 by 40, 1 by 30, 0 by 10
    rows = [[3, 2]] * 50 + [[3, 4]] * 20 + [[4, 1]] * 20 + [[0, 1]] * 10
    ahead = LayerAhead(this, nxt, Router(rows), min_tokens=2)
    _next_layer_step(nxt.slots, [5])  # a load of the next layer's timed
    ahead.idle_s[step_kind(len(rows))] = 1.0  # a long free time: every missing expert the slots can take is admitted
    this.slots.begin_layer()
    ahead.prefetch(torch.zeros(len(rows), H))
    # five slots, one holding 5: the four experts most rows want load, the fifth (0: 10 rows) does not
    assert nxt.slots.in_flight(range(E)) == [1, 2, 3, 4]
    assert nxt.slots.stats.prefetch_skipped == 1
    this.slots.end_step()
    nxt.slots.finish_loads()
    engine.shutdown()


def test_an_expert_predicted_wrongly_again_and_again_stops_loading_ahead(experts):  # noqa: F811
    """The router keeps predicting expert 5 for the next layer, which needs 0-4 instead (so 5 leaves its five
    slots): after two wrong predictions (precision 1.0 -> 0.7 -> 0.49, under MIN_EXPERT_PRECISION) 5 is no
    longer tried ahead (neither loaded nor tried for a slot); the prediction is still scored, so once the next
    layer needs 5 when it is predicted (0.49 -> 0.64), it is tried again the next time it is missing."""
    folder, _ = experts
    engine, this, nxt = _pair(folder)
    ahead = LayerAhead(this, nxt, Router([[5, 0], [0, 5]]), min_tokens=2)
    x = torch.zeros(2, H)
    _next_layer_step(nxt.slots, [0])
    tried = []  # loaded ahead, or tried and found no slot its guess was worth
    others = [0, 1, 2, 3, 4]
    for needed in (others, others, [0, 5, 2, 3, 4], others, others):  # the fourth: 5 resident, not predicted missing
        stats = nxt.slots.stats
        before = stats.prefetch_loads + stats.prefetch_skipped
        this.slots.begin_layer()
        ahead.prefetch(x)
        this.slots.end_step()
        nxt.slots.finish_loads()
        tried.append(stats.prefetch_loads + stats.prefetch_skipped - before)
        _next_layer_step(nxt.slots, needed)
        assert nxt.slots.slot_map.slot_of(5) is None or 5 in needed
    assert tried == [1, 1, 0, 0, 1]
    assert nxt.slots.stats.prefetch_loads == 1  # the first: a free slot
    assert ahead.precision[step_kind(2)][5] == pytest.approx(0.49 + 0.3 * 0.51)
    engine.shutdown()


def test_loads_ahead_take_slots_only_after_the_layers_own_misses(experts):  # noqa: F811
    """Two layers sharing a pool of 6 slots, 4 of them holding each layer's last experts: the running layer's
    two misses take the two free slots, and the next layer's load ahead (deferred until they are admitted)
    finds none it may take. Made first, it took a free slot and the layer's own load evicted a resident."""
    folder, _ = experts
    engine, (this, nxt) = _pooled(folder, 2, 6, share=3, link=LinkEmulator(latency_ms=LOAD_MS))
    for slots in (this, nxt):
        _next_layer_step(slots, [0, 1])
    ahead = LayerAhead(Layer(this), Layer(nxt), Router([[4, 5], [5, 4]]), min_tokens=2)
    this.begin_layer()
    this.after_own_loads(lambda: ahead.prefetch(torch.zeros(2, H)))
    assert nxt.in_flight(range(E)) == []  # nothing before the layer's own loads
    this.ensure([2, 3])
    this.end_step()
    resident = [(n, e) for n, slots in enumerate((this, nxt)) for e in range(E) if slots.slot_map.slot_of(e) is not None]
    assert resident == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1)]
    assert nxt.stats.prefetch_loads == 0 and nxt.stats.prefetch_skipped == 1
    engine.shutdown()


# -- real engines --

def _rounds() -> list[dict]:
    """Two rounds of four 40-token prompts of held-out text: prefills and batched decode steps."""
    tokens = np.load(TINY_PYMOE / "heldout-tokens.npy")
    starts = [(0, 3000, 6000, 9000), (12000, 15000, 18000, 21000)]
    return [{"prompts": [[1] + tokens[s:s + 40].tolist() for s in group]} for group in starts]


def _job(name: str, **offload) -> dict:
    engine = {"additional_config": {"moe_offload": {"budget": "25%", **offload}}} if offload else {}
    return {"name": name, "model": str(TINY_PYMOE), "engine": engine, "rounds": _rounds(), "max_tokens": 12}


@pytest.fixture(scope="module")
def stock(tiny_models, tmp_path_factory):
    return run_engines(tmp_path_factory.mktemp("stock"), [_job("stock")], stock=True)["stock"]


@pytest.mark.engine
def test_layer_ahead_keeps_stock_tokens_and_predicts_trained_routing(stock, tmp_path):
    runs = run_engines(tmp_path, [
        _job("lru", policy="lru"),  # on by default
        _job("lru/off", policy="lru", layer_ahead=False),
        _job("fate", policy="fate"),
        _job("klotski", policy="klotski"),
    ], stock=False)
    for name, result in runs.items():
        assert round_tokens(result) == round_tokens(stock), name
    lru, off, fate, klotski = (offload_total(runs[name]) for name in ("lru", "lru/off", "fate", "klotski"))
    precision = lru["layer_ahead_right"] / lru["layer_ahead_predicted"]
    print(f"trained tiny-pymoe, lru 25%, 4 x (40 + 12): {lru['layer_ahead_predicted']} experts loaded ahead, "
          f"precision {precision:.3f}; misses {lru['misses']} against {off['misses']} without")
    assert precision > 0.5  # chance: top_k / num_experts = 0.125
    assert off["layer_ahead_predicted"] == 0 and off["prefetch_loads"] == 0
    assert lru["misses"] < off["misses"]
    for total in (fate, klotski):
        assert total["layer_ahead_predicted"] > 0
    plan = "the next one's first experts while they compute"
    assert open(runs["lru"]["log"]).read().count(plan) == 3  # lru's, fate's and klotski's plans


@pytest.mark.engine
def test_layer_ahead_in_the_default_multiprocess_engine(stock, tmp_path):
    """The loads ahead run in the worker process, as users run it."""
    result = run_engines(tmp_path, [_job("lru", policy="lru")], stock=False, multiprocess=True)["lru"]
    assert round_tokens(result) == round_tokens(stock)
    total = offload_total(result)
    assert total["layer_ahead_predicted"] > 0 and total["layer_ahead_right"] > 0


def test_predictor_name_matches_the_stats():
    assert PREDICTOR.replace("-", "_") + "_predicted" == "layer_ahead_predicted"
