"""The transfer engine: where expert loads run, and the link emulator.

One protocol, :class:`TransferEngine`; :class:`ThreadTransferEngine` runs loads
on CPU threads (the engine's worker keeps one core for itself and leaves the
other to these threads). A CUDA engine would add a copy stream and events
behind the same ``submit``.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

T = TypeVar("T")

logger = logging.getLogger("vllm.moe_offload.transfer")


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


class TransferEngine(Protocol):
    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]: ...

    def shutdown(self) -> None: ...


class TransferEngineDead(RuntimeError):
    """The I/O workers cannot run loads any more; the engine must stop rather than hang."""


class ThreadTransferEngine:
    """Runs loads on a small pool of background threads.

    A load that raises is reported through its future and the thread lives on.
    The pool itself counts as dead once it is shut down, or when one load has
    run longer than ``stuck_after_s`` (a read blocked in the kernel never
    returns, and every later load would queue behind it): :meth:`submit` then
    raises :class:`TransferEngineDead` instead of queueing work that never runs.
    """

    def __init__(self, num_threads: int = 1, stuck_after_s: float | None = None) -> None:
        self.num_threads = num_threads
        self.stuck_after_s = stuck_after_s
        self._pool = ThreadPoolExecutor(
            max_workers=num_threads, thread_name_prefix="moe-offload-io", initializer=_one_openmp_thread,
        )
        self._lock = threading.Lock()
        self._running: dict[int, tuple[float, Callable[..., Any], tuple]] = {}  # job id -> (start time, fn, args)
        self._next_id = 0

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        self.check_alive()
        with self._lock:
            job_id, self._next_id = self._next_id, self._next_id + 1

        def run() -> T:
            with self._lock:
                # the call itself, formatted only if it gets stuck: formatting tensor arguments
                # here cost each load a device sync and a printout of the tensor
                self._running[job_id] = (time.monotonic(), fn, args)
            try:
                return fn(*args)
            finally:
                with self._lock:
                    self._running.pop(job_id, None)

        try:
            return self._pool.submit(run)
        except RuntimeError as exc:  # "cannot schedule new futures after shutdown"
            raise TransferEngineDead(f"the expert I/O threads are gone ({exc}); the engine cannot load experts") from exc

    def check_alive(self) -> None:
        """Raise :class:`TransferEngineDead` when a load has been stuck past ``stuck_after_s``."""
        if self.stuck_after_s is None:
            return
        now = time.monotonic()
        with self._lock:
            stuck = [(now - t, fn, args) for t, fn, args in self._running.values() if now - t > self.stuck_after_s]
        if stuck:
            age_s, fn, args = max(stuck, key=lambda job: job[0])
            what = f"{getattr(fn, '__qualname__', fn)}{_describe(args)}"
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
        self._pool.shutdown(wait=wait, cancel_futures=True)


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
