"""A layer's slot pool over a real checkpoint: loads, remapping, statistics, failed reads."""

import os
import threading
import time

import pytest
import torch
from safetensors.torch import save_file

from vllm_moe_offload.core.cache import SlotMap
from vllm_moe_offload.core.replacement import make_policy
from vllm_moe_offload.runtime.safetensors_io import CheckpointIndex, ThreadLocalReaders
from vllm_moe_offload.runtime.slots import ExpertLoadError, LayerSlots
from vllm_moe_offload.runtime.expert_layout import per_expert_layout
from vllm_moe_offload.runtime.tiers import DiskSource, HostSource
from vllm_moe_offload.runtime.transfer import LinkEmulator, ThreadTransferEngine, TransferEngineDead

E, I, H = 6, 8, 4
PREFIX = "model.layers.0.block_sparse_moe.experts"


def _identity(w1, w3, w2, into=None):
    return torch.cat([w1, w3]), w2


@pytest.fixture
def experts(tmp_path):
    torch.manual_seed(0)
    tensors = {}
    for e in range(E):
        tensors[f"{PREFIX}.{e}.w1.weight"] = torch.randn(I, H)
        tensors[f"{PREFIX}.{e}.w3.weight"] = torch.randn(I, H)
        tensors[f"{PREFIX}.{e}.w2.weight"] = torch.randn(H, I)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return tmp_path, tensors


def _slots(folder, num_slots, policy="lru", link=LinkEmulator(), tier="disk"):
    readers = ThreadLocalReaders(direct_io=True)
    source = DiskSource(CheckpointIndex(folder), per_expert_layout(PREFIX, "w1", "w3", "w2"), _identity, readers)
    if tier == "host":
        source = HostSource(source, E, pin=False)
    slot_map = SlotMap(E, num_slots, make_policy(policy, E, num_slots, top_k=2))
    return LayerSlots(
        0, torch.zeros(num_slots, 2 * I, H), torch.zeros(num_slots, H, I), slot_map, source,
        ThreadTransferEngine(2), link,
    )


def _pooled(folder, num_layers: int, num_slots: int, share: int, link=None):
    """``num_layers`` layers' slots sharing one pool of ``num_slots`` (LRU each), on one transfer engine."""
    from vllm_moe_offload.core.cache import LRUPolicy
    from vllm_moe_offload.core.shared_pool import SharedPool
    from vllm_moe_offload.runtime.slots import slot_pool

    readers = ThreadLocalReaders(direct_io=True)
    source = DiskSource(CheckpointIndex(folder), per_expert_layout(PREFIX, "w1", "w3", "w2"), _identity, readers)
    pool = SharedPool(num_layers, E, num_slots, 2)
    cpu = torch.device("cpu")
    w13, w2 = slot_pool(num_slots, (2 * I, H), torch.float32, cpu), slot_pool(num_slots, (H, I), torch.float32, cpu)
    engine = ThreadTransferEngine(1)
    layers = [LayerSlots(n, w13, w2, pool.view(n).attach(LRUPolicy(E, 2)), source, engine,
                         link if link is not None else LinkEmulator(), share=share) for n in range(num_layers)]
    return engine, layers


@pytest.mark.parametrize("tier", ["disk", "host"])
def test_ensure_loads_the_right_bytes_and_remaps(experts, tier):
    folder, tensors = experts
    slots = _slots(folder, 3, tier=tier)
    slots.ensure([4, 1])
    ids = torch.tensor([[4, 1], [1, 4]], dtype=torch.int32)
    slot_ids = slots.remap(ids)
    assert slot_ids.dtype == torch.int32
    for expert, slot in ((4, int(slot_ids[0, 0])), (1, int(slot_ids[0, 1]))):
        w13 = torch.cat([tensors[f"{PREFIX}.{expert}.w1.weight"], tensors[f"{PREFIX}.{expert}.w3.weight"]])
        assert torch.equal(slots.w13_slots[slot], w13)
        assert torch.equal(slots.w2_slots[slot], tensors[f"{PREFIX}.{expert}.w2.weight"])
    assert (slots.stats.hits, slots.stats.misses, slots.stats.loads) == (0, 2, 2)
    assert slots.stats.bytes_read[tier] > 0
    slots.ensure([1, 0])
    assert (slots.stats.hits, slots.stats.misses) == (1, 3)


def test_remap_keeps_the_ids_dtype_and_follows_loads(experts):
    # the slot table is cached per dtype; a load or an eviction between two calls must show in the next
    folder, _ = experts
    slots = _slots(folder, 2)
    slots.ensure([4, 1])
    for dtype in (torch.int32, torch.int64, torch.int16, torch.int32):
        got = slots.remap(torch.tensor([[4, 1], [1, 0]], dtype=dtype))
        assert got.dtype == dtype
        assert got[0].tolist() == [slots.slot_map.slot_of(4), slots.slot_map.slot_of(1)] and int(got[1, 1]) == -1
    slots.ensure([0, 1])  # 4 leaves for 0
    got = slots.remap(torch.tensor([[0, 4]], dtype=torch.int32))
    assert got.tolist() == [[slots.slot_map.slot_of(0), -1]]


def test_read_time_counts_each_taken_load(experts):
    # every load waits out a 30 ms emulated link: two demand loads and one prefetch read at least 90 ms in
    # all, and the stall (the forward pass waiting) is no more than the reads it waited for
    folder, _ = experts
    slots = _slots(folder, 3, link=LinkEmulator(latency_ms=30))
    slots.ensure([0, 1])
    assert slots.stats.loads == 2 and 0.06 <= slots.stats.read_s
    assert slots.stats.stall_s <= slots.stats.read_s + 0.01
    slots.prefetch([2])
    slots.finish_loads()
    assert slots.stats.loads == 3 and slots.stats.read_s >= 0.09
    assert slots.stats_dict()["read_s"] == slots.stats.read_s


def test_eviction_forgets_the_old_slot(experts):
    folder, _ = experts
    slots = _slots(folder, 2)
    slots.ensure([0, 1])
    slots.ensure([2, 1])  # evicts 0
    assert int(slots.remap(torch.tensor([0]))[0]) == -1
    assert int(slots.remap(torch.tensor([2]))[0]) in (0, 1)


def test_ondemand_drops_misses_at_step_end(experts):
    folder, _ = experts
    slots = _slots(folder, 4, policy="ondemand")
    slots.warm()  # experts 0 and 1 stay for good
    assert slots.stats.loads == 2
    slots.ensure([0, 5])
    slots.end_step()
    slots.ensure([0, 5])
    assert slots.stats.misses == 2 and slots.stats.hits == 2  # 5 had to be read again


def test_a_failed_read_fails_only_its_experts_and_frees_their_slots(experts):
    folder, tensors = experts
    slots = _slots(folder, 3)
    slots.ensure([0])
    path = folder / "model.safetensors"
    os.truncate(path, 4096)  # experts past the first block can no longer be read
    with pytest.raises(ExpertLoadError, match="layer 0: loading expert 5 from the disk tier failed") as info:
        slots.ensure([5, 0])
    assert info.value.experts == (5,) and info.value.layer_idx == 0
    assert slots.slot_map.slot_of(5) is None
    assert int(slots.remap(torch.tensor([5]))[0]) == -1
    assert len(slots.slot_map) == 1 and slots.stats.failed_loads == 1
    # the resident expert is still served, with its bytes intact
    slot = int(slots.remap(torch.tensor([0]))[0])
    assert torch.equal(slots.w2_slots[slot], tensors[f"{PREFIX}.0.w2.weight"])


def test_a_checkpoint_changed_after_startup_is_never_read(experts):
    folder, _ = experts
    slots = _slots(folder, 3)
    slots.ensure([0])
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data)  # same bytes, rewritten: the index can no longer vouch for the offsets
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    with pytest.raises(ExpertLoadError, match="changed after start-up") as info:
        slots.ensure([1, 2])
    assert set(info.value.experts) == {1, 2}
    assert len(slots.slot_map) == 1


def test_a_checkpoint_removed_after_startup_serves_intact_bytes_or_fails_clearly(experts):
    """A reader that already holds the file open reads the indexed inode, whose bytes are intact;
    one that must open it afresh fails its loads naming the file, and residents are still served."""
    folder, tensors = experts
    index = CheckpointIndex(folder)
    names = per_expert_layout(PREFIX, "w1", "w3", "w2")

    def slots_over(readers):
        source = DiskSource(index, names, _identity, readers)
        slot_map = SlotMap(E, 3, make_policy("lru", E, 3, top_k=2))
        return LayerSlots(0, torch.zeros(3, 2 * I, H), torch.zeros(3, H, I), slot_map, source,
                          ThreadTransferEngine(1), LinkEmulator())

    opened = slots_over(ThreadLocalReaders(direct_io=True))
    opened.ensure([0])  # its one I/O thread opened the file
    os.remove(folder / "model.safetensors")
    opened.ensure([1, 0])
    for expert in (0, 1):
        slot = int(opened.remap(torch.tensor([expert]))[0])
        assert torch.equal(opened.w2_slots[slot], tensors[f"{PREFIX}.{expert}.w2.weight"])
    fresh = slots_over(ThreadLocalReaders(direct_io=True))
    with pytest.raises(ExpertLoadError, match="loading expert 2 from the disk tier failed: .*model.safetensors") as info:
        fresh.ensure([2])
    assert info.value.experts == (2,) and len(fresh.slot_map) == 0


def test_a_slow_load_times_out_keeps_its_slot_reserved_and_lands_later(experts):
    folder, tensors = experts
    # every load lasts >= 0.4 s; the forward pass waits 0.1 s at most
    slots = _slots(folder, 2, link=LinkEmulator(latency_ms=400))
    slots.load_timeout_s = 0.1
    started = time.perf_counter()
    with pytest.raises(ExpertLoadError, match="took longer than 0.1 s") as info:
        slots.ensure([3])
    assert time.perf_counter() - started < 0.35
    assert info.value.experts == (3,)
    assert slots.slot_map.slot_of(3) is not None  # reserved: the I/O thread still writes it
    assert int(slots.remap(torch.tensor([3]))[0]) == -1  # but never read
    with pytest.raises(ExpertLoadError, match="still running"):
        slots.ensure([3])  # still late
    time.sleep(0.4)
    slots.ensure([3])  # it arrived: resident and correct
    slot = int(slots.remap(torch.tensor([3]))[0])
    assert torch.equal(slots.w2_slots[slot], tensors[f"{PREFIX}.3.w2.weight"])


def test_a_late_load_is_never_evicted_under_its_writer(experts):
    folder, _ = experts
    slots = _slots(folder, 2, policy="ondemand", link=LinkEmulator(latency_ms=300))
    slots.load_timeout_s = 0.05
    with pytest.raises(ExpertLoadError):
        slots.ensure([4])
    slots.end_step()  # ondemand drops step experts, but not one whose load is running
    assert slots.slot_map.slot_of(4) is not None
    with pytest.raises(ExpertLoadError) as info:
        slots.ensure([1, 2])  # both slots: one is reserved by the late load of 4
    assert 4 not in info.value.experts


def test_a_dead_transfer_engine_fails_fast(experts):
    folder, _ = experts
    slots = _slots(folder, 2)
    slots.engine.shutdown()
    with pytest.raises(TransferEngineDead, match="I/O threads are gone"):
        slots.ensure([1])


def test_a_stuck_io_thread_is_reported_instead_of_hanging():
    engine = ThreadTransferEngine(1, stuck_after_s=0.1)
    release = threading.Event()
    engine.submit(release.wait)
    time.sleep(0.25)
    with pytest.raises(TransferEngineDead, match="stuck for"):
        engine.submit(lambda: None)
    release.set()
    engine.shutdown()


def test_submitting_a_load_never_formats_its_arguments():
    # formatting a CUDA tensor argument synchronised the device on every load (scripts/gpu_check.py's
    # copies ran at 6.5 GB/s on an H200 whose pinned link gave 55 GB/s)
    class Loud:
        def __repr__(self):
            raise AssertionError("an argument was formatted on the submit path")

    engine = ThreadTransferEngine(1, stuck_after_s=60)
    assert engine.submit(lambda *args: len(args), Loud(), (Loud(),)).result() == 2
    engine.shutdown()


def test_a_stuck_load_is_described_with_tensor_shapes_not_values():
    engine = ThreadTransferEngine(1, stuck_after_s=0.1)
    release = threading.Event()
    engine.submit(lambda *_: release.wait(), torch.zeros(3, 5, dtype=torch.bfloat16), 7)
    time.sleep(0.25)
    try:
        with pytest.raises(TransferEngineDead, match=r"\(tensor\[3, 5\] torch.bfloat16 on cpu, 7\)"):
            engine.submit(lambda: None)
    finally:
        release.set()  # else the blocked I/O thread keeps the interpreter from exiting
        engine.shutdown()


def test_link_emulator_makes_loads_last_at_least_the_emulated_time(experts):
    folder, _ = experts
    # 2 loads of one ~12 KiB span each over an emulated 0.001 GB/s link with 20 ms latency
    slots = _slots(folder, 2, link=LinkEmulator(gbps=0.001, latency_ms=20))
    started = time.perf_counter()
    slots.ensure([0, 1])
    assert time.perf_counter() - started >= 0.02 + 4096 / 1e6
    assert "EMULATED" in slots.link.describe()


def test_prefetch_makes_experts_ready_and_scores_the_prediction(experts):
    folder, tensors = experts
    slots = _slots(folder, 3, policy="arc")
    slots.prefetch([3, 4, 5])
    slots.finish_loads()  # all three landed (a queued one the pass does not need would be cancelled)
    slots.ensure([3, 1])  # 3 was prefetched, 1 was not: it evicts 4 or 5, loaded ahead for nothing
    assert slots.stats.prefetch_unused == 1
    assert slots.stats.prefetch_hits == 1 and slots.stats.misses == 1 and slots.stats.hits == 0
    assert slots.stats.prefetch_loads == 3 and slots.stats.loads == 4
    assert (slots.stats.predicted, slots.stats.predicted_right, slots.stats.needed_when_predicted) == (3, 1, 2)
    slot = int(slots.remap(torch.tensor([3]))[0])
    assert torch.equal(slots.w2_slots[slot], tensors[f"{PREFIX}.3.w2.weight"])
    slots.ensure([3])  # now a plain cache hit; later passes are not scored again
    assert slots.stats.hits == 1 and slots.stats.predicted == 3
    slots.prefetch([0])  # the other unused prefetched expert, still resident, is counted once
    assert slots.stats.prefetch_unused == 2


def test_prefetch_never_evicts_what_is_in_flight(experts):
    folder, _ = experts
    slots = _slots(folder, 2, link=LinkEmulator(latency_ms=50))
    slots.prefetch([0, 1])
    slots.prefetch([2, 3])  # both slots hold loads in flight or just finished: nothing can be admitted
    slots.ensure([0, 1])
    assert slots.stats.prefetch_hits + slots.stats.hits == 2 and slots.stats.misses == 0


def test_demand_loads_feed_the_engines_link_rate(experts):
    # the transfer engine measures the tier's rate on every load it runs, demand loads included
    folder, _ = experts
    slots = _slots(folder, 3)
    assert slots.engine.rate.bytes_per_s is None
    slots.ensure([0, 1])
    assert slots.engine.rate.bytes_per_s is not None and slots.engine.rate.bytes_per_s > 0
