"""The transfer engine: where expert loads run, and the link emulator.

One protocol, :class:`TransferEngine`; :class:`ThreadTransferEngine` runs loads
on CPU threads (the engine's worker keeps one core for itself and leaves the
other to these threads). A CUDA engine would add a copy stream and events
behind the same ``submit``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


class TransferEngine(Protocol):
    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]: ...

    def shutdown(self) -> None: ...


class ThreadTransferEngine:
    """Runs loads on a small pool of background threads."""

    def __init__(self, num_threads: int = 1) -> None:
        self._pool = ThreadPoolExecutor(max_workers=num_threads, thread_name_prefix="moe-offload-io")

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        return self._pool.submit(fn, *args)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


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
