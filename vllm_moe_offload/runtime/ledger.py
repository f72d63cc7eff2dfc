"""The expert budget ledger: every fast-memory allocation for experts is registered before it is made.

One :class:`BudgetLedger` per worker knows the budget in bytes. The slot pools,
the I/O threads' read buffers (and their growth), each expert's conversion
temporaries while it converts, and on CUDA the pinned staging ring reserve
their bytes here first; a reservation that would take the total past the
budget raises :class:`BudgetExceeded` and nothing is allocated. The host
tier's copy of every expert is the slow tier and is not counted.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from vllm_moe_offload.core.config import format_bytes


class MemoryKind(str, enum.Enum):
    SLOTS = "slots"  # the slot pools of every offloaded layer
    READ_BUFFER = "read_buffer"  # the I/O threads' aligned read buffers
    CONVERT = "convert"  # one expert's temporaries while it is converted to kernel layout
    STAGING_RING = "staging_ring"  # the pinned host buffers of CUDA copies
    PROBE = "probe"  # the one expert copied at start-up to measure the link


class BudgetExceeded(MemoryError):
    """An allocation for experts would take the plugin past its budget."""


class BudgetLedger:
    """Held and peak bytes by :class:`MemoryKind`, never above ``budget_bytes``. Thread-safe."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._held = {kind: 0 for kind in MemoryKind}
        self._peak = {kind: 0 for kind in MemoryKind}
        self._held_bytes = 0
        self._peak_bytes = 0
        self._lock = threading.Lock()

    def reserve(self, kind: MemoryKind, num_bytes: int, what: str) -> None:
        """Register ``num_bytes`` of ``kind`` about to be allocated for ``what``; raises past the budget."""
        if num_bytes < 0:
            raise ValueError(f"cannot reserve {num_bytes} bytes for {what}")
        with self._lock:
            if self._held_bytes + num_bytes > self.budget_bytes:
                raise BudgetExceeded(
                    f"MoE offload: {what} ({kind.value}, {num_bytes} bytes) does not fit the expert budget: "
                    f"{self._held_bytes} bytes already held ({self._describe_held()}), budget "
                    f"{self.budget_bytes} bytes ({format_bytes(self.budget_bytes)})"
                )
            self._held[kind] += num_bytes
            self._held_bytes += num_bytes
            self._peak[kind] = max(self._peak[kind], self._held[kind])
            self._peak_bytes = max(self._peak_bytes, self._held_bytes)

    def release(self, kind: MemoryKind, num_bytes: int) -> None:
        with self._lock:
            if num_bytes > self._held[kind]:
                raise ValueError(f"releasing {num_bytes} bytes of {kind.value}, only {self._held[kind]} held")
            self._held[kind] -= num_bytes
            self._held_bytes -= num_bytes

    @contextmanager
    def holding(self, kind: MemoryKind, num_bytes: int, what: str) -> Iterator[None]:
        """Reserve for the duration of a ``with`` block (temporaries)."""
        self.reserve(kind, num_bytes, what)
        try:
            yield
        finally:
            self.release(kind, num_bytes)

    @property
    def held_bytes(self) -> int:
        return self._held_bytes

    @property
    def peak_bytes(self) -> int:
        return self._peak_bytes

    def held(self, kind: MemoryKind) -> int:
        return self._held[kind]

    def stats(self) -> dict:
        with self._lock:
            return {
                "held_bytes": self._held_bytes,
                "peak_held_bytes": self._peak_bytes,
                "held_by_kind": {k.value: v for k, v in self._held.items()},
                "peak_by_kind": {k.value: v for k, v in self._peak.items()},
            }

    def _describe_held(self) -> str:
        parts = [f"{kind.value} {num}" for kind, num in self._held.items() if num]
        return ", ".join(parts) or "nothing"
