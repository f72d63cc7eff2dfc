"""The scheduled link in a real slot pool and transfer engine: demand first, held prefetches, admission, the guard."""

import threading

import pytest
import torch

from tests.runtime.test_slots import E, H, I, PREFIX, _identity, experts  # noqa: F401 (fixture)
from vllm_moe_offload.core.cache import SlotMap
from vllm_moe_offload.core.link import LoadPriority
from vllm_moe_offload.core.replacement import make_policy
from vllm_moe_offload.runtime.expert_layout import per_expert_layout
from vllm_moe_offload.runtime.safetensors_io import CheckpointIndex, ThreadLocalReaders
from vllm_moe_offload.runtime.slots import LayerSlots
from vllm_moe_offload.runtime.tiers import DiskSource
from vllm_moe_offload.runtime.transfer import LinkEmulator, ThreadTransferEngine


class RecordingSource(DiskSource):
    """The real disk source, noting the order in which experts are read."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.order: list[int] = []

    def fetch(self, expert, *args, **kwargs):
        self.order.append(expert)
        return super().fetch(expert, *args, **kwargs)


def _scheduled_slots(folder, num_slots: int, latency_ms: float = 0.0, engine=None, order=None) -> LayerSlots:
    source = RecordingSource(
        CheckpointIndex(folder), per_expert_layout(PREFIX, "w1", "w3", "w2"), _identity,
        ThreadLocalReaders(direct_io=True),
    )
    if order is not None:
        source.order = order
    if engine is None:
        engine = ThreadTransferEngine(1)  # one lane: loads queue
        engine.schedule_prefetches = True
    return LayerSlots(
        0, torch.zeros(num_slots, 2 * I, H), torch.zeros(num_slots, H, I),
        SlotMap(E, num_slots, make_policy("lru", E, num_slots, top_k=2)), source, engine,
        LinkEmulator(latency_ms=latency_ms),
    )


def test_engine_runs_demand_loads_before_queued_prefetches_and_holds_prefetches():
    engine = ThreadTransferEngine(1)
    ran: list[str] = []
    gate = threading.Event()
    busy = engine.submit(gate.wait)  # the lane is taken: everything below queues
    far = engine.submit(ran.append, "far", priority=LoadPriority(demand=False, needed_at=5, confidence=0.9))
    near_low = engine.submit(ran.append, "near-low", priority=LoadPriority(demand=False, needed_at=2, confidence=0.1))
    near = engine.submit(ran.append, "near", priority=LoadPriority(demand=False, needed_at=2, confidence=0.8))
    cancelled = engine.submit(ran.append, "stale", priority=LoadPriority(demand=False, needed_at=1))
    assert cancelled.cancel()
    miss = engine.submit(ran.append, "miss")
    gate.set()
    for job in (busy, far, near_low, near, miss):
        job.result(timeout=10)
    assert ran == ["miss", "near", "near-low", "far"]

    engine.hold_prefetches()
    guess = engine.submit(ran.append, "guess", priority=LoadPriority(demand=False, num_bytes=7))
    engine.submit(ran.append, "miss 2").result(timeout=10)
    assert not guess.done() and engine.prefetch_backlog_bytes() == 7
    engine.release_prefetches()
    guess.result(timeout=10)
    assert ran[-2:] == ["miss 2", "guess"] and engine.prefetch_backlog_bytes() == 0
    assert engine.rate.bytes_per_s is not None  # measured on the guess's 7 bytes (the others read none)

    # a held prefetch that a layer now waits for runs as a demand load; the other guesses stay held
    engine.hold_prefetches()
    likely = engine.submit(ran.append, "likely", priority=LoadPriority(demand=False, confidence=0.9))
    waited = engine.submit(ran.append, "waited for", priority=LoadPriority(demand=False, confidence=0.1))
    assert engine.promote(waited)
    waited.result(timeout=10)
    assert ran[-1] == "waited for" and not likely.done()
    assert not engine.promote(waited)  # done: nothing to promote
    engine.release_prefetches()
    likely.result(timeout=10)
    engine.shutdown()


class CountingCondition(type(threading.Condition())):
    """A condition counting the times it wakes every thread waiting on it (the engine's: its I/O threads)."""

    wakes = 0

    def notify_all(self):
        self.wakes += 1
        super().notify_all()


def test_a_layer_that_held_nothing_back_wakes_no_io_thread(monkeypatch):
    # every MoE layer holds prefetches at its start and releases them: with nothing queued that must not wake
    # the I/O threads (a futex wake and a thread switch per layer, about 20 us of a decode step's layer here)
    monkeypatch.setattr(threading, "Condition", CountingCondition)
    engine = ThreadTransferEngine(1)
    for _ in range(5):
        engine.hold_prefetches()
        engine.release_prefetches()
    assert engine._lock.wakes == 0
    engine.hold_prefetches()
    guess = engine.submit(lambda: "guess", priority=LoadPriority(demand=False))
    engine.release_prefetches()  # a held prefetch: the threads must hear of it
    assert guess.result(timeout=10) == "guess" and engine._lock.wakes == 1
    engine.shutdown()


@pytest.mark.parametrize("scheduled", [True, False])
def test_a_layers_prefetches_wait_for_its_own_misses(experts, scheduled):  # noqa: F811
    # with the link schedule and without it (fate's gated prefetches): demand first
    folder, tensors = experts
    order: list[int] = []  # experts read, both layers (the same checkpoint stands for both)
    engine = ThreadTransferEngine(1)  # one lane: loads queue
    engine.schedule_prefetches = scheduled
    this = _scheduled_slots(folder, 4, engine=engine, order=order)
    nxt = _scheduled_slots(folder, 4, engine=engine, order=order)
    this.begin_layer()  # holds prefetches until this layer's own loads are queued
    nxt.prefetch([3, 4], distance=1)  # the next layer's guesses, issued first
    this.ensure([0, 1])  # this layer's misses: read before them
    this.end_step()
    nxt.begin_layer()
    nxt.ensure([4])
    assert order == [0, 1, 3, 4]
    assert nxt.stats.prefetch_loads == 2 and nxt.stats.prefetch_hits == 1 and nxt.stats.misses == 0
    slot = int(nxt.remap(torch.tensor([4]))[0])
    assert torch.equal(nxt.w2_slots[slot], tensors[f"{PREFIX}.4.w2.weight"])
    this.engine.shutdown()


def test_prefetches_are_admitted_while_the_link_would_idle(experts):  # noqa: F811
    folder, _ = experts
    slots = _scheduled_slots(folder, 4, latency_ms=200)  # loads stay in flight while the test looks
    engine = slots.engine
    engine.rate.add(slots.expert_bytes, 0.010)  # one expert: 10 ms
    engine.clock.compute_s = 0.015  # 15 ms of compute per layer
    slots.prefetch([1, 2, 3], distance=1)  # loads start at 0 and 10 ms; the third would start at 20
    assert slots.stats.prefetch_loads == 2 and slots.stats.prefetch_refused == 1
    assert slots.in_flight([1, 2, 3]) == [1, 2]
    slots.prefetch([5], distance=2)  # 20 ms of prefetches ahead of it, 30 ms of compute until its layer
    assert slots.in_flight([5]) == [5]
    slots.finish_loads()
    slots.engine.shutdown()


def test_a_prefetch_never_evicts_an_expert_scored_above_it(experts):  # noqa: F811
    folder, _ = experts
    slots = _scheduled_slots(folder, 2)
    slots.ensure([0, 1])
    slots.end_step()
    scores = [0.5, 0.1, 0.3, 0.05, 0.02, 0.03]
    # expert 0 (0.5) outranks the guess 2 (0.3); expert 1 (0.1) does not and leaves; 3 (0.05) finds no slot
    slots.prefetch([2, 3], distance=1, scores=scores)
    slots.finish_loads()
    assert set(slots.slot_map.resident()) == {0, 2}
    assert slots.stats.prefetch_loads == 1
    slots.engine.shutdown()
