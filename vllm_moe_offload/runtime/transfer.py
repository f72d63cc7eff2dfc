"""The transfer engine: where expert loads run, and the link emulator.

One protocol, :class:`TransferEngine`; :class:`ThreadTransferEngine` runs loads
on CPU threads, free to run on any CPU the process may use (vLLM pins its
worker's threads to the cores it computes on). A CUDA engine would add a copy stream and events
behind the same ``submit``. The threads take loads from one queue per engine
(one tier), demand loads first and prefetches nearest layer first
(``core/link.py``); the engine also measures the tier's bandwidth and the
compute between MoE layers, which decide what a prefetch may queue.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, TypeVar

from vllm_moe_offload.core.link import DEMAND, LayerClock, LinkRate, LoadPriority, LoadQueue

T = TypeVar("T")

logger = logging.getLogger("vllm.moe_offload.transfer")


def _float_over_all_cpus() -> None:
    """Let a loader thread run on any CPU the process may use, not only on its creator's.

    A thread inherits its creator's CPU affinity, and vLLM's CPU worker pins
    each of its OpenMP threads to one core (``VLLM_CPU_OMP_THREADS_BIND``; by
    default, on this 2-core machine, the whole worker to core 0). A loader
    thread started by the worker's main thread could then run only on the core
    the model computes on: a load queued while a layer computes would not even
    issue its read until that core is free, and the core vLLM leaves to the
    other processes would go unused. The kernel keeps the mask inside the
    process's cpuset.
    """
    try:
        os.sched_setaffinity(0, range(os.cpu_count() or 1))
    except (AttributeError, OSError) as exc:  # no affinity on this platform, or none allowed: keep the inherited
        logger.debug("MoE offload: loader thread keeps its CPU affinity (%s)", exc)


def _one_openmp_thread() -> None:
    """Keep a loader thread's OpenMP work (the CPU prepack of an expert) on one thread.

    Otherwise the loader thread gets its own OpenMP team and the process runs
    more OpenMP threads than cores, and every parallel region of the model pays
    for waking them: measured here, the MoE kernel took 125-145 us per call with
    a loader team against 81-85 us without (stock: 80-88 us).
    ``torch.set_num_threads`` is not used because vLLM's CPU worker replaces it.
    """
    try:
        ctypes.CDLL(None).omp_set_num_threads(1)
    except (OSError, AttributeError):
        logger.debug("no OpenMP runtime in this process; loader threads left as they are")


class Loaded(NamedTuple):
    """What an expert load returns: the bytes it read and the seconds the read took (its I/O thread's)."""

    bytes_read: int
    read_s: float


class TransferEngine(Protocol):
    def submit(self, fn: Callable[..., T], *args: Any, priority: LoadPriority = DEMAND) -> Future[T]: ...

    def shutdown(self) -> None: ...


class TransferEngineDead(RuntimeError):
    """The I/O workers cannot run loads any more; the engine must stop rather than hang."""


class ThreadTransferEngine:
    """Runs loads on a small pool of background threads, most urgent first.

    Queued loads wait in a :class:`LoadQueue` (demand before prefetch; see
    ``core/link.py``); a queued load's future can be cancelled and is then
    never run. A load that raises is reported through its future and the
    thread lives on. The pool itself counts as dead once it is shut down, or
    when one load has run longer than ``stuck_after_s`` (a read blocked in the
    kernel never returns, and every later load would queue behind it):
    :meth:`submit` then raises :class:`TransferEngineDead` instead of queueing
    work that never runs.
    """

    def __init__(self, num_threads: int = 1, stuck_after_s: float | None = None) -> None:
        self.num_threads = num_threads
        self.stuck_after_s = stuck_after_s
        self._lock = threading.Condition()
        # queued: (future, call, what, live) where live[0] turns False when the job is queued again
        # as a demand load (promote); a future cancelled while queued is never run
        self._queue: LoadQueue[tuple[Future, Callable[[], Any], str, list[bool]]] = LoadQueue(
            lambda job: job[0].cancelled() or not job[3][0],
        )
        self._queued: dict[Future, tuple[Callable[[], Any], str, list[bool], LoadPriority]] = {}
        self._running: dict[int, tuple[float, _Call, LoadPriority]] = {}  # job id -> (start time, what, priority)
        self._next_id = 0
        self._closed = False
        self._held = False  # prefetches wait while the current layer's demand loads are not yet queued
        #: the tier's measured read bandwidth (per I/O thread) and the compute between MoE layers
        self.rate = LinkRate()
        self.clock = LayerClock()
        #: turned on by the setup when prefetches are scheduled (``link_schedule``)
        self.schedule_prefetches = False
        self._last_layer: tuple[Any, float] | None = None  # (stats of the layer that started last, its stall then)
        self._threads = [
            threading.Thread(target=self._work, name=f"moe-offload-io_{i}", daemon=True) for i in range(num_threads)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable[..., T], *args: Any, priority: LoadPriority = DEMAND) -> Future[T]:
        self.check_alive()
        future: Future[T] = Future()
        what = _Call(fn, args)  # formatted only if the load gets stuck
        with self._lock:
            if self._closed:
                raise TransferEngineDead("the expert I/O threads are gone (shut down); the engine cannot load experts")
            live = [True]
            call = lambda: fn(*args)  # noqa: E731
            self._queue.push((future, call, what, live), priority)
            self._queued[future] = (call, what, live, priority)
            self._lock.notify()
        return future

    def promote(self, future: Future) -> bool:
        """Make queued ``future`` a demand load: a layer now waits for it (it runs even while prefetches
        are held, before every prefetch; a demand load keeps its place). False when it is not queued
        here (running, done, or another engine's future)."""
        with self._lock:
            queued = self._queued.get(future)
            if queued is None or future.done():
                return False
            call, what, live, priority = queued
            if priority.demand:
                return True
            live[0] = False
            live = [True]
            self._queue.push((future, call, what, live), DEMAND)
            self._queued[future] = (call, what, live, DEMAND)
            self._lock.notify()
            return True

    def layer_started(self, stats: Any, hold: bool = True) -> int:
        """A MoE layer (its statistics ``stats``, with ``stall_s``) starts: tick :attr:`clock`; ``hold``
        prefetches (a layer that may load experts of its own; see :meth:`hold_prefetches`).

        The previous layer's waits for loads since it started are not compute.
        Returns the clock's layer count.
        """
        last = self._last_layer
        stall_s = last[0].stall_s - last[1] if last is not None else 0.0
        self._last_layer = (stats, stats.stall_s)
        if hold:
            self.hold_prefetches()
        return self.clock.tick(time.perf_counter(), stall_s)

    def hold_prefetches(self) -> None:
        """Queued prefetches wait until :meth:`release_prefetches` (demand loads still run).

        A MoE layer holds them from its start until its own misses are queued (or
        it knows it has none, or it waits for a load): prefetches for later layers
        are issued at a layer's start, and with the queue empty the first one would
        otherwise take the I/O thread before the layer's demand loads arrive.
        """
        with self._lock:
            self._held = True

    def release_prefetches(self) -> None:
        with self._lock:
            if self._held:
                self._held = False
                if self._queue:  # only a queued prefetch can have been held back: wake the threads for it
                    self._lock.notify_all()

    def prefetch_backlog_bytes(self) -> int:
        """Bytes of prefetches queued or running: what a new prefetch would wait behind."""
        with self._lock:
            running = sum(p.num_bytes for _, _, p in self._running.values() if not p.demand)
            return running + self._queue.queued_prefetch_bytes()

    def _work(self) -> None:
        _float_over_all_cpus()
        _one_openmp_thread()
        while True:
            with self._lock:
                while True:
                    got = self._queue.pop(demand_only=self._held)
                    if got is not None or self._closed:
                        break
                    self._lock.wait()
                if got is None:
                    return
                priority, (future, call, what, _) = got
                self._queued.pop(future, None)
                if not future.set_running_or_notify_cancel():
                    continue
                job_id, self._next_id = self._next_id, self._next_id + 1
                started = time.monotonic()
                self._running[job_id] = (started, what, priority)
            try:
                result = call()
            except BaseException as exc:  # noqa: BLE001 - reported through the future
                future.set_exception(exc)
            else:
                took_s = time.monotonic() - started
                read = result.bytes_read if isinstance(result, Loaded) else priority.num_bytes
                self.rate.add(read, took_s)
                future.set_result(result)
            finally:
                with self._lock:
                    self._running.pop(job_id, None)

    def check_alive(self) -> None:
        """Raise :class:`TransferEngineDead` when a load has been stuck past ``stuck_after_s``."""
        if self.stuck_after_s is None:
            return
        now = time.monotonic()
        with self._lock:
            stuck = [(now - t, what) for t, what, _ in self._running.values() if now - t > self.stuck_after_s]
        if stuck:
            age_s, what = max(stuck, key=lambda job: job[0])
            raise TransferEngineDead(
                f"an expert I/O thread has been stuck for {age_s:.1f} s (limit {self.stuck_after_s:g} s) in {what}; "
                "the slow tier does not answer, so the engine stops instead of hanging"
            )

    def shutdown(self) -> None:
        try:
            self.check_alive()
            wait = True
        except TransferEngineDead:
            wait = False  # joining a thread blocked in a read would hang the shutdown
        with self._lock:
            self._closed = True
            for future, *_ in self._queue.drain():
                future.cancel()
            self._queued.clear()
            self._lock.notify_all()
        if wait:
            for thread in self._threads:
                if thread is not threading.current_thread():
                    thread.join()


class _Call:
    """A load's function and arguments, formatted only for a message.

    Formatting a CUDA tensor argument costs a device sync: on the H200,
    scripts/gpu_check.py's copies through the engine (whose arguments are 32 MiB
    tensors) ran at 6.5 GB/s when every submit formatted them, where plain
    pinned copies ran at 55 GB/s.
    """

    __slots__ = ("fn", "args")

    def __init__(self, fn: Callable[..., Any], args: tuple) -> None:
        self.fn, self.args = fn, args

    def __str__(self) -> str:
        return f"{getattr(self.fn, '__qualname__', self.fn)}{_describe(self.args)}"


def _describe(args: tuple) -> str:
    """``args`` for a message: tensors by shape, dtype and device, never by value."""
    parts = []
    for arg in args:
        if isinstance(arg, tuple):
            parts.append(_describe(arg))
        elif hasattr(arg, "shape") and hasattr(arg, "dtype"):
            parts.append(f"tensor{list(arg.shape)} {arg.dtype} on {getattr(arg, 'device', '?')}")
        else:
            parts.append(repr(arg))
    return "(" + ", ".join(parts) + ")"


@dataclass(frozen=True)
class LinkEmulator:
    """Makes a transfer last at least ``latency + bytes / bandwidth``.

    For modelling a PCIe link from a CPU machine in benchmarks; every report
    made with it must say so. ``gbps`` is in GB/s (10^9 bytes per second).
    """

    gbps: float | None = None
    latency_ms: float = 0.0

    @property
    def active(self) -> bool:
        return self.gbps is not None or self.latency_ms > 0

    def pace(self, num_bytes: int, started_s: float) -> None:
        """Sleep until the emulated transfer of ``num_bytes`` begun at ``started_s`` is over."""
        if not self.active:
            return
        wire_s = num_bytes / (self.gbps * 1e9) if self.gbps else 0.0
        remaining_s = started_s + self.latency_ms / 1e3 + wire_s - time.perf_counter()
        if remaining_s > 0:
            time.sleep(remaining_s)

    def describe(self) -> str:
        if not self.active:
            return "no link emulation"
        bw = f"{self.gbps:g} GB/s" if self.gbps else "unlimited bandwidth"
        return f"EMULATED link: {bw}, {self.latency_ms:g} ms latency per transfer"
