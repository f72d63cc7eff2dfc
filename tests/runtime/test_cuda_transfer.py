"""The CUDA transfer engine: what is device-agnostic runs on CPU everywhere; streams and events need a GPU."""

from __future__ import annotations

import threading

import pytest
import torch

from vllm_moe_offload.runtime.cuda_transfer import (
    STAGING_ALIGN_BYTES,
    CudaTransferEngine,
    StagingRing,
    make_transfer_engine,
)
from vllm_moe_offload.core.plan import staging_for
from vllm_moe_offload.runtime.ledger import BudgetExceeded, BudgetLedger
from vllm_moe_offload.runtime.transfer import ThreadTransferEngine, TransferEngineDead

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_cpu_slots_get_the_thread_engine():
    engine = make_transfer_engine(torch.device("cpu"), 2, 1024, stuck_after_s=30.0)
    assert type(engine) is ThreadTransferEngine and engine.stuck_after_s == 30.0
    engine.shutdown()


@needs_cuda
def test_cuda_slots_get_the_cuda_engine_with_a_staging_ring_per_thread_plus_one():
    engine = make_transfer_engine(torch.device("cuda"), 2, 1000)
    try:
        assert isinstance(engine, CudaTransferEngine) and engine.copy_stream is not None
        assert engine.staging.depth == 3 and engine.staging.pinned
    finally:
        engine.shutdown()


def test_on_cpu_the_engine_runs_loads_on_io_threads_and_reports_failures():
    engine = CudaTransferEngine(torch.device("cpu"), num_threads=2, max_expert_bytes=4096)
    try:
        names = engine.submit(lambda: threading.current_thread().name).result()
        assert names.startswith("moe-offload-io")
        failing = engine.submit(lambda: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            failing.result()
        assert engine.submit(lambda a, b: a + b, 2, 3).result() == 5  # the thread lived on
        dst, src = torch.zeros(3, 5), torch.randn(3, 5)
        engine.submit(engine.copy_in, (dst,), (src,)).result()
        assert torch.equal(dst, src)
    finally:
        engine.shutdown()
    with pytest.raises(TransferEngineDead):
        engine.submit(lambda: None)


def test_staging_ring_hands_out_aligned_views_in_turn_and_copies_exactly():
    ring = StagingRing(buffer_bytes=4096, depth=2, pin=False)
    a = torch.randn(7, 3, dtype=torch.bfloat16)  # 42 bytes: the next tensor must start aligned
    b = torch.arange(10, dtype=torch.float32).view(2, 5)
    i0, (va, vb) = ring.stage([a, b])
    assert torch.equal(va, a) and torch.equal(vb, b)
    assert va.dtype == a.dtype and vb.shape == b.shape
    assert vb.data_ptr() - va.data_ptr() == STAGING_ALIGN_BYTES
    assert va.data_ptr() % 64 == 0  # buffers come from the allocator, views inside keep dtype alignment
    i1, _ = ring.stage([b])
    i2, (again,) = ring.stage([a])
    assert (i0, i1, i2) == (0, 1, 0)  # a ring of two
    assert torch.equal(again, a)


def test_staging_ring_waits_for_the_copy_that_last_read_a_buffer():
    class Event:  # the ring's contract with an event: synchronize() returns when the copy is done
        waited = False

        def synchronize(self):
            Event.waited = True

    ring = StagingRing(buffer_bytes=1024, depth=1, pin=False)
    index, _ = ring.stage([torch.ones(4)])
    ring.release(index, Event())
    ring.stage([torch.ones(4)])
    assert Event.waited


def test_staging_ring_refuses_an_expert_larger_than_its_buffers():
    ring = StagingRing(buffer_bytes=1024, depth=2, pin=False)
    with pytest.raises(ValueError, match="does not fit a 1024-byte staging buffer"):
        ring.stage([torch.zeros(300)])  # 1200 bytes


def test_staging_ring_is_reserved_in_the_ledger_as_planned():
    engine = CudaTransferEngine(torch.device("cpu"), num_threads=2, max_expert_bytes=1000, ledger=BudgetLedger(10**6))
    try:
        planned = staging_for(io_threads=2, expert_bytes=1000, read_span_bytes=1000, cuda=True).ring_bytes
        ring = engine.staging
        assert ring.depth * ring.buffer_bytes == planned == 3 * 1280
    finally:
        engine.shutdown()
    ledger = BudgetLedger(3 * 1280 - 1)
    with pytest.raises(BudgetExceeded, match=r"the staging ring \(3 x 1280\) \(staging_ring, 3840 bytes\)"):
        StagingRing(buffer_bytes=1280, depth=3, pin=False, ledger=ledger)
    assert ledger.held_bytes == 0


@needs_cuda
def test_cuda_copies_run_on_the_copy_stream_and_order_the_compute_stream():
    device = torch.device("cuda")
    engine = CudaTransferEngine(device, num_threads=1, max_expert_bytes=64 * 2**20)
    try:
        src = torch.randn(16 * 2**20)  # pageable: goes through the pinned staging ring
        dst = torch.empty(16 * 2**20, device=device)
        seen = {}

        def load():
            seen["stream"] = torch.cuda.current_stream(device)
            engine.copy_in((dst,), (src,))

        job = engine.submit(load)
        job.result()
        assert seen["stream"] == engine.copy_stream
        assert torch.equal((dst * 1).cpu(), src)  # read on the compute stream right after result()
    finally:
        engine.shutdown()


@needs_cuda
def test_cuda_slot_loads_match_all_resident_on_the_gpu():
    from scripts.gpu_check import check_slots

    for pinned in (True, False):
        got = check_slots(torch.device("cuda"), pinned, steps=8)
        assert got["mismatches"] == 0 and got["misses"] > 0
