"""The budget ledger: held and peak bytes by kind, never above the budget."""

import threading

import pytest

from vllm_moe_offload.runtime.ledger import BudgetExceeded, BudgetLedger, MemoryKind


def test_reservations_are_counted_by_kind_with_their_peak():
    ledger = BudgetLedger(1000)
    ledger.reserve(MemoryKind.SLOTS, 600, "slots")
    with ledger.holding(MemoryKind.CONVERT, 300, "converting"):
        assert ledger.held_bytes == 900
    ledger.reserve(MemoryKind.READ_BUFFER, 400, "a read buffer")
    stats = ledger.stats()
    assert stats["held_bytes"] == 1000 and stats["peak_held_bytes"] == 1000
    assert stats["held_by_kind"] == {"slots": 600, "read_buffer": 400, "convert": 0, "staging_ring": 0, "probe": 0}
    assert stats["peak_by_kind"]["convert"] == 300


def test_a_reservation_past_the_budget_raises_and_changes_nothing():
    ledger = BudgetLedger(1000)
    ledger.reserve(MemoryKind.SLOTS, 900, "slots")
    with pytest.raises(
        BudgetExceeded,
        match=r"growing a read buffer \(read_buffer, 101 bytes\) does not fit the expert budget: 900 bytes already "
        r"held \(slots 900\), budget 1000 bytes",
    ):
        ledger.reserve(MemoryKind.READ_BUFFER, 101, "growing a read buffer")
    assert ledger.held_bytes == 900 and ledger.peak_bytes == 900
    with pytest.raises(BudgetExceeded):
        with ledger.holding(MemoryKind.CONVERT, 200, "converting"):
            pass
    ledger.reserve(MemoryKind.READ_BUFFER, 100, "exactly the rest")
    assert ledger.held_bytes == 1000


def test_release_more_than_held_is_a_bug():
    ledger = BudgetLedger(1000)
    ledger.reserve(MemoryKind.SLOTS, 10, "slots")
    with pytest.raises(ValueError, match="releasing 11 bytes of slots, only 10 held"):
        ledger.release(MemoryKind.SLOTS, 11)


def test_concurrent_holds_never_exceed_the_budget():
    ledger = BudgetLedger(3 * 100)
    refused = []

    def work():
        for _ in range(200):
            try:
                with ledger.holding(MemoryKind.CONVERT, 100, "converting"):
                    assert ledger.held_bytes <= 300
            except BudgetExceeded:
                refused.append(1)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert ledger.peak_bytes <= 300 and ledger.held_bytes == 0


def test_an_expert_fetch_past_the_budget_raises_naming_the_conversion(tmp_path):
    import torch
    from safetensors.torch import save_file

    from vllm_moe_offload.core.plan import staging_for
    from vllm_moe_offload.runtime.expert_layout import per_expert_layout
    from vllm_moe_offload.runtime.safetensors_io import CheckpointIndex, ThreadLocalReaders
    from vllm_moe_offload.runtime.tiers import DiskSource

    prefix = "model.layers.0.block_sparse_moe.experts"
    names = [f"{prefix}.{e}.{proj}.weight" for e in range(2) for proj in ("w1", "w2", "w3")]
    save_file({name: torch.randn(16, 64, dtype=torch.bfloat16) for name in names}, str(tmp_path / "model.safetensors"))
    index = CheckpointIndex(tmp_path)
    expert_bytes = 3 * 16 * 64 * 2
    staging = staging_for(io_threads=1, expert_bytes=expert_bytes, read_span_bytes=index.largest_expert_span())

    def convert(w1, w3, w2, into=None):  # checkpoint -> [2I, H] and [H, I], as the unsharded CPU layout
        return torch.cat([w1, w3]), w2.t().contiguous()

    def source(budget_bytes):
        ledger = BudgetLedger(budget_bytes)
        readers = ThreadLocalReaders(True, lanes=1, ledger=ledger, convert_bytes=staging.convert_bytes)
        return ledger, DiskSource(index, per_expert_layout(prefix, "w1", "w3", "w2"), convert, readers, num_experts=2)

    ledger, exact = source(staging.total_bytes)  # the planned reservation is enough
    assert exact.fetch(1).w13.shape == (32, 64)
    assert ledger.peak_bytes <= staging.total_bytes
    ledger, short = source(staging.total_bytes - 1)
    ledger.reserve(MemoryKind.SLOTS, staging.read_buffer_bytes, "slots")  # what the read buffer would have taken
    what = rf"converting expert 1 of {prefix} \(convert, {staging.convert_bytes} bytes\) does not fit"
    with pytest.raises(BudgetExceeded, match=what):
        short.fetch(1)
    assert ledger.held_bytes == staging.read_buffer_bytes  # nothing left behind
