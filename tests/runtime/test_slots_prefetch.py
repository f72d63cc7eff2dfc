"""Fate's prefetch rules in a real slot pool: spare useful experts, score by distance, nearer wins."""

import torch

from tests.runtime.test_slots import E, H, I, PREFIX, _identity, _slots, experts  # noqa: F401 (fixture)
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
