"""The staging reservation comes out of the budget before the slots are split."""

import pytest

from vllm_moe_offload.core.config import Budget, OffloadConfigError
from vllm_moe_offload.core.plan import (
    READ_ALIGN_BYTES,
    STAGING_ALIGN_BYTES,
    minimum_bytes,
    plan_slots,
    read_buffer_bytes,
    ring_buffer_bytes,
    staging_for,
)


def test_read_buffer_covers_any_alignment_of_the_span():
    assert read_buffer_bytes(1) == 2 * READ_ALIGN_BYTES
    assert read_buffer_bytes(READ_ALIGN_BYTES) == 2 * READ_ALIGN_BYTES
    assert read_buffer_bytes(READ_ALIGN_BYTES + 1) == 3 * READ_ALIGN_BYTES
    # the widest aligned window over a span of n bytes, at every start offset, fits
    for span in (1, 100, 4095, 4096, 4097, 196_608, 200_001):
        widest = max(
            -(-(start + span) // READ_ALIGN_BYTES) * READ_ALIGN_BYTES - start // READ_ALIGN_BYTES * READ_ALIGN_BYTES
            for start in range(0, READ_ALIGN_BYTES, 97)
        )
        assert widest <= read_buffer_bytes(span), span


def test_staging_is_threads_times_read_buffer_and_conversion_plus_the_cuda_ring():
    # one 196608-byte expert (tiny mixtral), read in one 196608-byte span
    cpu = staging_for(io_threads=1, expert_bytes=196_608, read_span_bytes=196_608)
    assert cpu.read_buffer_bytes == 196_608 + READ_ALIGN_BYTES  # 48 whole blocks + one for misalignment
    assert cpu.convert_bytes == 196_608 + 2 * 196_608  # the read tensors + loader buffers + converted expert
    assert cpu.ring_bytes == 0 and cpu.total_bytes == 200_704 + 589_824 == 790_528
    two = staging_for(io_threads=2, expert_bytes=196_608, read_span_bytes=196_608)
    assert two.total_bytes == 2 * cpu.total_bytes
    cuda = staging_for(io_threads=2, expert_bytes=1000, read_span_bytes=2000, cuda=True)
    assert ring_buffer_bytes(1000) == 1024 + STAGING_ALIGN_BYTES
    assert cuda.ring_bytes == 3 * 1280  # one buffer per thread plus one draining
    assert cuda.total_bytes == 2 * (read_buffer_bytes(2000) + 2000 + 2000) + 3 * 1280
    with pytest.raises(ValueError, match="bad staging geometry"):
        staging_for(io_threads=0, expert_bytes=1000, read_span_bytes=2000)


def test_loads_that_convert_nothing_reserve_only_what_misses_the_slot():
    # a kernel-store load of a 96 MiB expert: read straight into the slot, nothing staged, nothing converted
    big = 96 * 2**20
    kernel = staging_for(io_threads=2, expert_bytes=big, read_span_bytes=0, convert=False)
    assert kernel.convert_bytes == 0 and kernel.read_buffer_bytes == READ_ALIGN_BYTES
    assert kernel.total_bytes == 2 * READ_ALIGN_BYTES
    # a quantized layer's small scales pass through the buffer: whole blocks of them
    scales = staging_for(io_threads=1, expert_bytes=big, read_span_bytes=5000, convert=False)
    assert scales.total_bytes == read_buffer_bytes(5000) == 3 * READ_ALIGN_BYTES
    checkpoint = staging_for(io_threads=2, expert_bytes=big, read_span_bytes=big)
    assert checkpoint.total_bytes > 6 * big  # what the same loads reserve when each converts
    # the budget of 4 slots and the checkpoint staging: the slots get that staging when nothing converts
    budget = Budget(num_bytes=4 * big + checkpoint.total_bytes)
    assert plan_slots(budget, 1, 16, 2, big, staging=kernel).layer_slots[0] >= 10
    assert plan_slots(budget, 1, 16, 2, big, staging=checkpoint).layer_slots == (4,)


def test_a_size_budget_holds_the_staging_and_the_slots():
    staging = staging_for(io_threads=1, expert_bytes=100, read_span_bytes=100)  # 8192 + 300
    assert staging.total_bytes == 8492
    plan = plan_slots(Budget(num_bytes=8492 + 10 * 100), 2, 8, 2, 100, staging=staging)
    assert plan.layer_slots == (5, 5) and plan.staging_bytes == 8492
    assert plan.slot_bytes + plan.staging_bytes <= plan.budget_bytes == 9492
    # without the staging the same budget would have held every expert
    assert plan_slots(Budget(num_bytes=9492), 2, 8, 2, 100).fully_resident


def test_a_share_budget_is_of_the_expert_bytes_with_the_staging_on_top():
    staging = staging_for(io_threads=1, expert_bytes=100, read_span_bytes=100)
    quarter = plan_slots(Budget(fraction=0.25), 2, 8, 2, 100, staging=staging)
    assert quarter.layer_slots == (2, 2) and quarter.budget_bytes == 400 + 8492
    whole = plan_slots(Budget(fraction=1.0), 2, 8, 2, 100, staging=staging)
    assert whole.fully_resident and whole.slot_bytes + whole.staging_bytes == whole.budget_bytes


def test_resident_layers_are_planned_from_what_the_staging_leaves():
    staging = staging_for(io_threads=1, expert_bytes=100, read_span_bytes=100)
    plan = plan_slots(Budget(num_bytes=8492 + 20 * 100), 4, 8, 2, 100, resident_layers=1, staging=staging)
    assert plan.layer_slots == (8, 4, 4, 4)


def test_minimum_includes_the_staging_and_names_its_parts():
    staging = staging_for(io_threads=2, expert_bytes=100, read_span_bytes=150)  # 2 x (8192 + 350)
    minimum = minimum_bytes(3, 2, 100) + staging.total_bytes
    assert minimum == 600 + 17_084
    assert plan_slots(Budget(num_bytes=minimum), 3, 8, 2, 100, staging=staging).layer_slots == (2, 2, 2)
    with pytest.raises(OffloadConfigError) as err:
        plan_slots(Budget(num_bytes=minimum - 1), 3, 8, 2, 100, staging=staging)
    message = str(err.value)
    assert message.startswith("budget 17.27 KiB (17683 bytes) is below the minimum one step needs: 17684 bytes")
    assert (
        "slots 600 (top_k=2 experts x 3 MoE layers x 100 bytes per expert) + staging 17084 "
        "(2 I/O threads x (read buffer 8192 + conversion 350))" in message
    )
    assert "allowed: 17684 to 19484 bytes (25% to 100% of expert bytes; a share gets the staging on top)" in message


def test_cuda_ring_is_named_in_the_minimum():
    staging = staging_for(io_threads=1, expert_bytes=100, read_span_bytes=100, cuda=True)
    with pytest.raises(OffloadConfigError, match=r"\+ CUDA staging ring 1024\)"):
        plan_slots(Budget(num_bytes=1000), 3, 8, 2, 100, staging=staging)
    # a share below top_k slots is refused whatever the staging
    with pytest.raises(OffloadConfigError, match="below the minimum"):
        plan_slots(Budget(fraction=0.2), 3, 8, 2, 100, staging=staging)


def test_what_an_even_split_leaves_goes_to_some_layers_as_one_more_slot():
    # 20 slots over 6 layers: 3 each and 2 spare, spread from the first layer
    plan = plan_slots(Budget(num_bytes=20 * 100 + 99), 6, 16, 2, 100)
    assert plan.layer_slots == (4, 3, 3, 4, 3, 3) and plan.slots_per_layer == 3
    assert plan.slot_bytes == 2000 <= plan.budget_bytes
    # a preference names the layers first (repeats and resident layers ignored, the rest follow in order)
    assert plan_slots(Budget(num_bytes=2000), 6, 16, 2, 100, extra_order=lambda base: [5, 5, 2]).layer_slots == (
        3, 3, 4, 3, 3, 4)
    assert plan_slots(Budget(num_bytes=2000), 6, 16, 2, 100, extra_order=lambda base: [4]).layer_slots == (
        4, 3, 3, 3, 4, 3)
    # a share budget too: 30% of 6 x 16 experts is 28.8 slots
    assert plan_slots(Budget(fraction=0.3), 6, 16, 2, 100).layer_slots == (5, 5, 4, 5, 5, 4)


def test_spare_slots_go_to_offloaded_layers_only():
    # 22 slots, 4 layers of 8 experts, layer 0 resident: 14 left for 3 layers -> 4 each and 2 spare
    plan = plan_slots(Budget(num_bytes=2200), 4, 8, 2, 100, resident_layers=1)
    assert plan.layer_slots == (8, 5, 5, 4) and plan.resident_layers == 1
    bases = []
    plan = plan_slots(Budget(num_bytes=2200), 4, 8, 2, 100, resident_layers=1,
                      extra_order=lambda base: bases.append(base) or [0, 3, 2, 1])
    assert plan.layer_slots == (8, 4, 5, 5) and bases == [4]


@pytest.mark.parametrize("num_layers,num_experts,resident", [(6, 16, 0), (4, 8, 1), (5, 7, 2), (1, 4, 0)])
def test_no_whole_expert_of_the_budget_stays_idle(num_layers, num_experts, resident):
    staging = staging_for(io_threads=1, expert_bytes=100, read_span_bytes=100)
    for budget_bytes in range(staging.total_bytes + num_layers * 2 * 100, staging.total_bytes
                              + num_layers * num_experts * 100 + 300, 37):
        plan = plan_slots(Budget(num_bytes=budget_bytes), num_layers, num_experts, 2, 100,
                          resident_layers=resident, staging=staging)
        assert plan.slot_bytes + plan.staging_bytes <= budget_bytes
        assert max(plan.layer_slots) <= num_experts and min(plan.layer_slots) >= 2
        assert max(plan.layer_slots) - plan.slots_per_layer <= 1 or plan.resident_layers > 0
        if not plan.fully_resident:
            assert budget_bytes - plan.staging_bytes - plan.slot_bytes < 100, plan
