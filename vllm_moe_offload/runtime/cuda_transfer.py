"""The CUDA transfer engine: loads on host threads, copies on a dedicated stream, ordered by events.

Implements :class:`~vllm_moe_offload.runtime.transfer.TransferEngine`. A load
submitted with :meth:`CudaTransferEngine.submit` runs on an I/O thread whose
current CUDA stream is the engine's copy stream, so the slot copies it issues
(:meth:`copy_in`) never queue behind the model's kernels. Ordering, with no
synchronisation of the compute stream:

* write after read: at submit time (on the caller's thread) an event is
  recorded on the caller's current stream, and the copy stream waits for it
  before the copy, so a slot is never overwritten while a kernel enqueued
  earlier may still read its previous expert;
* read after write: after the load an event is recorded on the copy stream; the
  future's :meth:`~_CopyFuture.result` makes the *calling* thread's current
  stream wait for it. The slot pool takes a load's result exactly when the
  expert is needed (``LayerSlots.ensure``), so the compute stream waits only
  then, and only on the GPU (the host thread goes on enqueueing).

Experts from pageable memory (the disk tier) are first copied into a small ring
of pinned staging buffers, each sized to the largest expert, so the host-to-
device copy is asynchronous; a buffer is reused only after the copy that read
it has finished (a host wait on the I/O thread, never on the compute stream).
On a CPU device the class is a plain :class:`ThreadTransferEngine` (copies in
place); the tests use that, and the staging ring unpinned, to check everything
but the streams.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

import torch

from vllm_moe_offload.core.link import DEMAND, LoadPriority
from vllm_moe_offload.core.plan import STAGING_ALIGN_BYTES, ring_buffer_bytes, round_up
from vllm_moe_offload.runtime.ledger import BudgetLedger, MemoryKind
from vllm_moe_offload.runtime.transfer import ThreadTransferEngine, TransferEngine

T = TypeVar("T")

logger = logging.getLogger("vllm.moe_offload.cuda_transfer")


class _CopyFuture(Future):
    """A load's future whose ``result()`` orders the caller's current stream after the copy."""

    def __init__(self, device: torch.device | None) -> None:
        super().__init__()
        self.device = device
        self.event: Any = None  # torch.cuda.Event recorded on the copy stream after the load

    def result(self, timeout: float | None = None):
        value = super().result(timeout)
        if self.event is not None:
            # enqueue a GPU-side wait: the kernel launched next on this stream reads the slot after the copy
            torch.cuda.current_stream(self.device).wait_event(self.event)
        return value


class StagingRing:
    """``depth`` pinned host buffers of ``buffer_bytes`` each, handed out in turn.

    :meth:`stage` copies host tensors into the next buffer and returns views of
    them; :meth:`release` attaches the event of the device copy that reads the
    buffer, and the next :meth:`stage` of that buffer first waits for it. The
    ring's bytes are reserved in ``ledger`` (when given) before it is allocated.
    """

    def __init__(self, buffer_bytes: int, depth: int, pin: bool, ledger: BudgetLedger | None = None) -> None:
        if buffer_bytes < 1 or depth < 1:
            raise ValueError(f"staging ring needs positive sizes, got {buffer_bytes} bytes x {depth}")
        self.buffer_bytes = buffer_bytes
        self.depth = depth
        self.pinned = pin
        if ledger is not None:
            what = f"the staging ring ({depth} x {buffer_bytes})"
            ledger.reserve(MemoryKind.STAGING_RING, depth * buffer_bytes, what)
        self._buffers = [torch.empty(buffer_bytes, dtype=torch.uint8, pin_memory=pin) for _ in range(depth)]
        self._events: list[Any] = [None] * depth
        self._next = 0
        self._lock = threading.Lock()

    def stage(self, tensors: Sequence[torch.Tensor]) -> tuple[int, list[torch.Tensor]]:
        """Copy ``tensors`` into the next free buffer; (buffer index, views shaped like the inputs)."""
        offsets, end = [], 0
        for t in tensors:
            offsets.append(end)
            end = _align(end + t.nbytes)
        if end > self.buffer_bytes:
            raise ValueError(f"expert of {end} bytes does not fit a {self.buffer_bytes}-byte staging buffer")
        with self._lock:
            index = self._next
            self._next = (index + 1) % self.depth
            event, self._events[index] = self._events[index], None
        if event is not None:
            event.synchronize()  # the device copy that last read this buffer is done
        buf = self._buffers[index]
        views = []
        for t, start in zip(tensors, offsets):
            view = buf[start : start + t.nbytes].view(t.dtype).view(t.shape)
            view.copy_(t)
            views.append(view)
        return index, views

    def release(self, index: int, event: Any) -> None:
        self._events[index] = event


def _align(num_bytes: int) -> int:
    return round_up(num_bytes, STAGING_ALIGN_BYTES)


class CudaTransferEngine(ThreadTransferEngine):
    """:class:`ThreadTransferEngine` whose loads, on CUDA, copy on one copy stream with events.

    See the module doc. The thread pool, its failure reporting and its
    stuck-load detection are the base class's.
    """

    def __init__(
        self, device: torch.device, num_threads: int = 1, max_expert_bytes: int = 0,
        ledger: BudgetLedger | None = None, **options: Any,
    ) -> None:
        super().__init__(num_threads, **options)
        self.device = torch.device(device)
        self.is_cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(self.device) if self.is_cuda else None
        # one buffer per thread staging, plus one draining: a thread never waits on its own last copy
        # (core/plan.py staging_for reserves the same: ring_buffer_bytes x (io_threads + 1))
        self.staging = (
            StagingRing(ring_buffer_bytes(max_expert_bytes), num_threads + 1, pin=self.is_cuda, ledger=ledger)
            if max_expert_bytes > 0 else None
        )

    def submit(self, fn: Callable[..., T], *args: Any, priority: LoadPriority = DEMAND) -> Future[T]:
        if not self.is_cuda:
            return super().submit(fn, *args, priority=priority)
        fence = torch.cuda.Event()
        fence.record(torch.cuda.current_stream(self.device))  # kernels enqueued so far: the slots' old readers
        inner = super().submit(self._on_copy_stream, fence, fn, args, priority=priority)
        outer = _CopyFuture(self.device)
        inner.add_done_callback(lambda done: _settle(outer, done))
        return outer

    def _on_copy_stream(self, fence: Any, fn: Callable[..., T], args: tuple) -> tuple[T, Any]:
        """Runs on an I/O thread: ``fn`` with the copy stream current, then the event after its copies."""
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(fence)
            value = fn(*args)
            event = torch.cuda.Event()
            event.record(self.copy_stream)
        return value, event

    def copy_in(self, dsts: Sequence[torch.Tensor], srcs: Sequence[torch.Tensor]) -> None:
        """Copy host ``srcs`` into device ``dsts`` (e.g. one slot's w13 and w2) on this thread's stream.

        Called from a submitted load. Pinned sources are copied directly; the
        others go through the staging ring so the copy stays asynchronous.
        """
        if self.is_cuda and self.staging is not None and not all(s.is_pinned() for s in srcs):
            index, srcs = self.staging.stage(srcs)
            for dst, src in zip(dsts, srcs):
                dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self.staging.release(index, event)
            return
        for dst, src in zip(dsts, srcs):
            dst.copy_(src, non_blocking=True)

    def shutdown(self) -> None:
        super().shutdown()
        if self.copy_stream is not None:
            self.copy_stream.synchronize()


def _settle(outer: _CopyFuture, inner: Future) -> None:
    """Hand the I/O thread's (value, event) or its failure to the caller's future."""
    if inner.cancelled():
        outer.set_exception(RuntimeError("transfer engine shut down before this load ran"))
        return
    exc = inner.exception()
    if exc is not None:
        outer.set_exception(exc)
        return
    value, outer.event = inner.result()
    outer.set_result(value)


def make_transfer_engine(
    device: torch.device, num_threads: int, max_expert_bytes: int, ledger: BudgetLedger | None = None, **options: Any,
) -> TransferEngine:
    """The engine for slots on ``device``: CUDA streams and pinned staging on a GPU, threads otherwise.

    The staging ring's bytes are reserved in ``ledger``. ``options`` go to
    :class:`ThreadTransferEngine` (e.g. ``stuck_after_s``).
    """
    if torch.device(device).type == "cuda":
        logger.info(
            "MoE offload transfers: CUDA copy stream, %d I/O thread(s), pinned staging %d x %d bytes",
            num_threads, num_threads + 1, ring_buffer_bytes(max_expert_bytes),
        )
        return CudaTransferEngine(device, num_threads, max_expert_bytes, ledger, **options)
    return ThreadTransferEngine(num_threads, **options)
