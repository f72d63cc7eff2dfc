"""A miss waits only for what it needs: queued wrong guesses are cancelled, running ones left to land.

Real slot pools on a real checkpoint and a real thread pool; the source holds
chosen experts' loads on an Event, so which loads are running, queued or done
is set by the test, not by timing.
"""

import threading
import time

import torch

from tests.runtime.test_slots import E, H, I, PREFIX, _identity, experts  # noqa: F401 (fixture)
from vllm_moe_offload.core.cache import SlotMap
from vllm_moe_offload.core.replacement import make_policy
from vllm_moe_offload.runtime.safetensors_io import CheckpointIndex, ThreadLocalReaders
from vllm_moe_offload.runtime.slots import LayerSlots
from vllm_moe_offload.runtime.expert_layout import per_expert_layout
from vllm_moe_offload.runtime.tiers import DiskSource
from vllm_moe_offload.runtime.transfer import LinkEmulator, ThreadTransferEngine

#: longest a test waits for a load it released (a hang fails the test instead of the suite)
RELEASE_WAIT_S = 10.0


class GatedSource:
    """A disk source whose loads of ``gated`` experts wait until :meth:`release`; logs fetch starts."""

    def __init__(self, inner: DiskSource, gated: set[int]) -> None:
        self.inner = inner
        self.tier = inner.tier
        self.gates = {e: threading.Event() for e in gated}
        self.started: list[int] = []  # experts in the order their fetch began
        self.running = {e: threading.Event() for e in range(E)}  # set when the expert's fetch began

    def fetch(self, expert_idx: int, into=None):
        self.started.append(expert_idx)
        self.running[expert_idx].set()
        gate = self.gates.get(expert_idx)
        if gate is not None:
            assert gate.wait(RELEASE_WAIT_S), f"expert {expert_idx}'s load was never released"
        return self.inner.fetch(expert_idx, into=into)

    def release(self, expert: int, after_s: float = 0.0) -> None:
        if after_s:
            threading.Timer(after_s, self.gates[expert].set).start()
        else:
            self.gates[expert].set()

    def close(self) -> None:
        self.inner.close()


def _slots(folder, num_slots: int, gated: set[int], io_threads: int) -> tuple[LayerSlots, GatedSource]:
    readers = ThreadLocalReaders(direct_io=True)
    disk = DiskSource(CheckpointIndex(folder), per_expert_layout(PREFIX, "w1", "w3", "w2"), _identity, readers)
    source = GatedSource(disk, gated)
    slot_map = SlotMap(E, num_slots, make_policy("lru", E, num_slots, top_k=2))
    slots = LayerSlots(0, torch.zeros(num_slots, 2 * I, H), torch.zeros(num_slots, H, I), slot_map, source,
                       ThreadTransferEngine(io_threads), LinkEmulator())
    return slots, source


def _assert_consistent(slots: LayerSlots, tensors: dict) -> None:
    """Every expert the kernel would see sits in its own slot with its own bytes; others map to -1."""
    resident = slots.slot_map.resident()
    assert len(set(resident.values())) == len(resident) <= slots.num_slots
    table = slots.remap(torch.arange(E, dtype=torch.int32)).tolist()
    for expert, slot in enumerate(table):
        if slot < 0:
            continue  # not resident, or its load is still running (never read then)
        assert resident.get(expert) == slot, (expert, slot, resident)
        assert torch.equal(slots.w2_slots[slot], tensors[f"{PREFIX}.{expert}.w2.weight"])


def _wait_running(source: GatedSource, expert: int) -> None:
    assert source.running[expert].wait(RELEASE_WAIT_S)


def test_a_queued_wrong_prefetch_is_cancelled_and_does_not_delay_the_miss(experts):  # noqa: F811
    folder, tensors = experts
    slots, source = _slots(folder, 4, gated={0}, io_threads=1)
    slots.prefetch([0, 1], spare_useful=True)  # 0 runs (held), 1 queues behind it
    _wait_running(source, 0)
    source.release(0, after_s=0.1)
    slots.ensure([2])  # the routing wants neither: 1 is dropped before it starts
    assert source.started == [0, 2]  # the miss ran right after the running load, never behind 1
    assert slots.stats.prefetch_cancelled == 1 and slots.stats.prefetch_loads == 1
    assert slots.slot_map.slot_of(1) is None and int(slots.remap(torch.tensor([1]))[0]) == -1
    assert slots.stats.misses == 1 and slots.stats.loads == 1  # 0 has not been collected yet
    _assert_consistent(slots, tensors)
    slots.end_step()
    slots.ensure([1])  # asked for later, the cancelled expert is loaded on demand
    assert slots.stats.misses == 2 and source.started[-1] == 1
    _assert_consistent(slots, tensors)
    slots.finish_loads()
    assert slots.stats.loads == 3  # 0 (prefetch, landed), 2 and 1 (misses)
    slots.engine.shutdown()


def test_a_running_wrong_prefetch_is_not_waited_for_when_the_miss_has_room(experts):  # noqa: F811
    folder, tensors = experts
    slots, source = _slots(folder, 4, gated={0}, io_threads=2)
    slots.prefetch([0], spare_useful=True)
    _wait_running(source, 0)
    started = time.perf_counter()
    slots.ensure([1, 2])  # loads on the second thread while 0 is still held
    assert time.perf_counter() - started < RELEASE_WAIT_S / 2
    assert slots.slot_map.slot_of(0) is not None  # its slot stays reserved for the running load
    assert int(slots.remap(torch.tensor([0]))[0]) == -1  # but the kernel never reads it
    _assert_consistent(slots, tensors)
    slots.end_step()  # no wait here either: 0 lands in the background
    assert slots.slot_map.slot_of(0) is not None
    source.release(0)
    slots.finish_loads()
    assert slots.stats.prefetch_cancelled == 0 and slots.stats.loads == 3
    _assert_consistent(slots, tensors)
    slots.ensure([0])  # landed late, still a hit that the prefetch made
    assert slots.stats.prefetch_hits == 1
    slots.engine.shutdown()


def test_a_running_prefetch_is_waited_for_when_needed_or_when_its_slot_is(experts):  # noqa: F811
    folder, tensors = experts
    slots, source = _slots(folder, 2, gated={0, 1}, io_threads=2)
    slots.prefetch([0, 1], spare_useful=True)  # both running, both held
    _wait_running(source, 0)
    _wait_running(source, 1)
    source.release(0, after_s=0.2)
    source.release(1, after_s=0.4)
    started = time.perf_counter()
    # 0 is needed; 3 misses and both slots are loading: it takes the slot of 1 once 1 lands
    slots.ensure([0, 3])
    assert time.perf_counter() - started >= 0.4
    assert slots.stats.prefetch_hits == 1 and slots.stats.misses == 1
    assert slots.slot_map.slot_of(1) is None and slots.stats.prefetch_unused == 1
    _assert_consistent(slots, tensors)
    assert sorted(slots.slot_map.resident()) == [0, 3]
    slots.engine.shutdown()


def test_a_queued_prefetch_a_later_pass_of_the_step_needs_is_kept(experts):  # noqa: F811
    folder, tensors = experts
    slots, source = _slots(folder, 4, gated={0}, io_threads=1)
    slots.prefetch([0, 1, 2], spare_useful=True)  # 0 runs (held), 1 and 2 queue
    _wait_running(source, 0)
    slots.score_prediction([0, 1, 3])  # the step needs 0, 1 and 3, in two passes
    source.release(0, after_s=0.1)
    slots.ensure([0, 3])
    assert slots.stats.prefetch_cancelled == 1 and slots.slot_map.slot_of(2) is None  # 2: needed by no pass
    slots.ensure([1])  # the second pass: its prefetch was kept
    assert slots.stats.prefetch_hits == 2 and slots.stats.misses == 1
    assert 2 not in source.started
    _assert_consistent(slots, tensors)
    slots.engine.shutdown()
