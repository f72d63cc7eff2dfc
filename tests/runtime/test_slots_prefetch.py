"""Fate's prefetch rules in a real slot pool: spare useful experts, score by distance, nearer wins."""

import pytest
import torch

from tests.runtime.test_slots import E, H, I, PREFIX, _identity, _pooled, _slots, experts  # noqa: F401 (fixture)
from vllm_moe_offload.core.cache import SlotMap
from vllm_moe_offload.core.replacement import make_policy
from vllm_moe_offload.runtime.safetensors_io import CheckpointIndex, ThreadLocalReaders
from vllm_moe_offload.runtime.slots import LayerSlots
from vllm_moe_offload.runtime.expert_layout import per_expert_layout
from vllm_moe_offload.runtime.tiers import DiskSource
from vllm_moe_offload.runtime.transfer import LinkEmulator, ThreadTransferEngine


def test_prefetch_spares_experts_the_last_step_used(experts):  # noqa: F811
    folder, _ = experts
    slots = _slots(folder, 2)
    slots.ensure([0, 1])
    slots.end_step()
    slots.prefetch([2, 3], spare_useful=True)  # 0 and 1 were just used: no slot for a guess
    assert slots.stats.prefetch_loads == 0 and slots.stats.prefetch_skipped == 1
    slots.ensure([2, 0])  # the guess was half right: 2 becomes an on-demand miss
    assert (slots.stats.hits, slots.stats.misses) == (1, 3)  # 0 and 1 missed at first
    assert (slots.stats.predicted, slots.stats.predicted_right) == (2, 1)
    slots.end_step()
    slots.prefetch([3], spare_useful=False)  # without the rule a guess evicts a just-used expert
    assert slots.stats.prefetch_loads == 1


def test_predictions_are_scored_by_distance_and_the_nearest_counts(experts):  # noqa: F811
    folder, _ = experts
    slots = _slots(folder, 4)
    slots.prefetch([3, 5], spare_useful=True, distance=2)
    slots.prefetch([4, 5], spare_useful=True, distance=1)
    slots.ensure([4, 5])
    stats = slots.stats_dict()
    assert (stats["predicted"], stats["predicted_right"], stats["needed_when_predicted"]) == (2, 2, 2)
    assert stats["distance_predicted"] == {1: 2, 2: 2}
    assert stats["recall_by_distance"] == {1: 1.0, 2: 0.5}


def test_a_nearer_prediction_cancels_queued_loads_of_a_farther_one(experts):  # noqa: F811
    folder, tensors = experts
    readers = ThreadLocalReaders(direct_io=True)
    source = DiskSource(CheckpointIndex(folder), per_expert_layout(PREFIX, "w1", "w3", "w2"), _identity, readers)
    slots = LayerSlots(
        0, torch.zeros(4, 2 * I, H), torch.zeros(4, H, I), SlotMap(E, 4, make_policy("lru", E, 4, top_k=2)),
        source, ThreadTransferEngine(1), LinkEmulator(latency_ms=100),  # one thread: loads queue
    )
    slots.prefetch([0, 1, 2], spare_useful=True, distance=3)  # 0 runs, 1 and 2 wait
    slots.prefetch([0, 1, 3], spare_useful=True, distance=1)  # 2 is no longer predicted
    assert slots.stats.prefetch_cancelled == 1 and slots.slot_map.slot_of(2) is None
    assert slots.stats.prefetch_loads == 3  # 0, 1, 3
    slots.ensure([0, 3])
    assert slots.stats.prefetch_hits == 2 and slots.stats.misses == 0
    slot = int(slots.remap(torch.tensor([3]))[0])
    assert torch.equal(slots.w2_slots[slot], tensors[f"{PREFIX}.3.w2.weight"])
    slots.end_step()
    slots.engine.shutdown()


def test_gated_predictions_load_only_once_they_have_paid(experts):  # noqa: F811
    """prefetch(gate=...) scores each prediction's missing experts when the layer runs, loaded or not, and
    loads them only while such predictions are right often enough for a load's time (core/prefetch_gate.py)."""
    folder, _ = experts
    slots = _slots(folder, 2)

    def pays(distance: int, kind: str = "token") -> bool:
        # one load: 2 ms; a layer: 1 ms (set again: the real loads here update the measured load time)
        slots.load_s_ema, slots.engine.clock.compute_s = 0.002, 0.001
        return slots.prefetch_pays(distance, kind)

    def predict(experts: list[int]) -> None:
        pays(1)
        slots.prefetch(experts, spare_useful=False, distance=1, gate="token")

    # no record yet (precision 0.5): 0.5 x 1 ms saved < 0.5 x 2 ms risked one layer ahead; two ahead it pays
    assert not pays(1) and pays(2)
    predict([0, 1])
    assert slots.stats.prefetch_loads == 0 and slots.stats.prefetch_gated == 2
    slots.ensure([0, 1])  # both right, though not loaded: precision 3/4 >= the 2/3 one layer ahead needs
    slots.end_step()
    assert pays(1) and not pays(1, "batch")  # kinds of step keep apart
    predict([2, 3])
    assert slots.stats.prefetch_loads == 2
    slots.ensure([2, 3])
    assert slots.stats.prefetch_hits == 2
    slots.end_step()
    predict([4, 5])  # loaded (or cancelled while queued, when the step needs others), and wrong
    assert slots.stats.prefetch_loads == 4
    slots.ensure([0, 1])
    slots.end_step()
    assert not pays(1)  # one wrong pair closes it again
    predict([2, 3])
    assert slots.stats.prefetch_loads + slots.stats.prefetch_cancelled == 4 and slots.stats.prefetch_gated == 4
    slots.ensure([2, 3])
    slots.end_step()
    # right again, so open one layer ahead; but a batch's prediction that queues behind its own loads (the
    # backlog) has no lead left: gated, and scored when the layer runs all the same
    for n in range(6):
        pair = [0, 1] if n % 2 else [4, 5]  # two slots: each pair is missing when predicted
        pays(1, "batch")
        slots.prefetch(pair, spare_useful=False, distance=1, gate="batch")
        slots.ensure(pair)
        slots.end_step()
    gated = slots.stats.prefetch_gated
    assert pays(1, "batch") and not slots.prefetch_pays(1, "batch", backlog_s=0.001)
    slots.prefetch([4, 5], spare_useful=False, distance=1, gate="batch", backlog_s=0.001)
    assert slots.stats.prefetch_gated == gated + 2
    # the backlog a batch's layer gives its predictions: its own missing experts at the measured load time
    resident = [e for e in range(6) if slots.slot_map.slot_of(e) is not None]
    assert len(resident) == 2
    slots.load_s_ema = 0.002
    assert slots.missing_load_s(resident) == 0.0
    assert slots.missing_load_s([*resident, *(e for e in range(6) if e not in resident)]) == pytest.approx(4 * 0.002)
    slots.load_s_ema = None
    assert slots.missing_load_s([e for e in range(6) if e not in resident]) == 0.0  # no load timed yet
    slots.engine.shutdown()


def test_a_gated_prefetch_that_evicts_what_the_next_step_needs_counts_as_wrong(experts):  # noqa: F811
    """Three layers sharing a pool of 6 slots: while layer 0 runs, a gated prediction for layer 1 evicts layer
    2's experts (the farthest from use); layer 2's next step loads one of them again, so that prediction is
    scored as one more wrong one (its load cost a load); a demand load of a victim after that next step is
    not blamed. Each step teaches the layer's gate what a demand load stalled that kind of step."""
    folder, _ = experts
    engine, layers = _pooled(folder, 3, 6, share=2)

    def step(n: int, needed: list[int], predict: list[int] | None = None) -> None:
        layers[n].begin_layer("token")
        if predict is not None:
            layers[n + 1].prefetch(predict, spare_useful=False, distance=1, gate="token")
        layers[n].ensure(needed)
        layers[n].end_step()

    for n, needed in enumerate(([0, 1], [2, 3], [4, 5])):
        step(n, needed)
    assert layers[0].prefetch_gate.stall_per_miss("token") > 0  # two demand loads waited for
    gate = layers[1].prefetch_gate
    for _ in range(5):
        gate.record((1, "token"), predicted=10, right=10)
    layers[1].load_s_ema, engine.clock.compute_s = 0.001, 0.01  # right and a long lead: the gate is open
    step(0, [0, 1], predict=[0, 1])  # layer 1's experts 0 and 1
    assert layers[1].stats.prefetch_loads == 2
    assert [e for e in range(E) if layers[2].slot_map.slot_of(e) is not None] == []  # layer 2's went
    step(1, [0, 1])  # right: both used
    before = gate.precision((1, "token"))
    step(2, [4, 3])  # layer 2's next step needs 4 again (3 was never evicted)
    assert gate.precision((1, "token")) < before
    for _ in range(2):
        for n, needed in enumerate(([0, 1], [0, 1], [4, 3])):
            step(n, needed)
    after = gate.precision((1, "token"))
    step(2, [5, 3])  # the other victim, needed three steps later: not blamed
    assert gate.precision((1, "token")) == after
    engine.shutdown()


def test_another_predictors_prediction_is_gated_and_counted_apart_from_the_routers(experts):  # noqa: F811
    """The next-token table's predictions (``predictor``) earn their own precision in the gate, leave the
    routers' prediction counts and look-ahead depth alone, and are counted as ``token_table_*``."""
    folder, _ = experts
    slots = _slots(folder, 2)

    def pays(predictor=None) -> bool:
        slots.load_s_ema, slots.engine.clock.compute_s = 0.002, 0.001  # a load: 2 ms; a layer: 1 ms
        return slots.prefetch_pays(1, "token", predictor=predictor)

    assert not pays() and not pays("token-table")  # no record (0.5): one layer ahead does not pay
    for pair in ([0, 1], [2, 3], [0, 1]):  # the table is right each time: its gate opens after the first
        pays()
        slots.prefetch(pair, distance=1, gate="token", predictor="token-table")
        slots.ensure(pair)
        slots.end_step()
    assert pays("token-table") and not pays()  # the router's has no record of its own
    assert (slots.stats.prefetch_gated, slots.stats.prefetch_loads, slots.stats.prefetch_hits) == (2, 4, 4)
    assert slots.stats.token_table_predicted == 6 and slots.stats.token_table_right == 6
    assert slots.stats.predicted == 0 and slots.prefetch_missing_ema is None
    pays()
    assert not slots.predicted_by("token-table")
    slots.prefetch([2, 3], distance=1, gate="token", predictor="token-table")
    assert slots.predicted_by("token-table")  # fate's router then leaves this step of the layer to it
    slots.prefetch([2, 3], distance=1)  # the router's prediction of the same step, ungated
    slots.ensure([2, 3])
    assert not slots.predicted_by("token-table")  # scored when the layer ran: the next step is not predicted
    stats = slots.stats_dict()
    assert (stats["prefetch_loads"], stats["prefetch_hits"], stats["token_table_right"]) == (6, 6, 8)
    assert (stats["predicted"], stats["predicted_right"]) == (2, 2) and slots.prefetch_missing_ema == 0
    slots.end_step()
    slots.engine.shutdown()
