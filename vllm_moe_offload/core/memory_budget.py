"""``--moe-offload-budget auto``: the largest expert budget that fits the memory this engine may use.

Arithmetic only. The runtime measures what the engine may still allocate
(``runtime/memory_limit.py``: a cgroup's limit less its use, or the system's
MemAvailable) in each worker once the non-expert weights are loaded, so the
other processes of the engine (API server, engine core) and the weights are
already counted. What is still to come is taken out before the experts get the
rest: the KV cache of every rank, and vLLM's working memory (a step's
activations, allocator slack), for which a safety margin is kept. The budget
is a size budget, so the staging of the loads comes out of it too (``core/plan.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm_moe_offload.core.config import format_bytes

#: vLLM's working memory besides weights, KV cache and slots: a step's activations and logits, the
#: allocator's slack, Python objects of new requests. A share of what is available, with a floor that
#: covers a tiny model's engine here (its RSS grows about 200-300 MiB over the first requests)
WORKING_SHARE = 0.10
WORKING_MIN_BYTES = 512 * 2**20
#: with no explicit KV cache size, vLLM's CPU worker gives its KV cache whatever is left of its share of
#: memory (``gpu_memory_utilization``) after the weights, slots included; auto leaves the KV cache this
#: share of that room, the experts the rest (``--kv-cache-memory-bytes`` makes the split explicit)
KV_SHARE_WHEN_UNSET = 0.5


@dataclass(frozen=True)
class MemoryView:
    """What this engine may still allocate, and where the figure comes from (said in the startup plan)."""

    available_bytes: int
    source: str


@dataclass(frozen=True)
class AutoBudget:
    """The budget ``auto`` chose, for all tensor-parallel ranks together, and the arithmetic behind it."""

    budget_bytes: int
    available_bytes: int
    kv_bytes: int  # one rank's KV cache
    working_bytes: int
    tp_size: int
    source: str
    kv_note: str

    def explain(self) -> str:
        ranks = f"{self.tp_size} x " if self.tp_size > 1 else ""
        return (
            f"budget auto = {format_bytes(self.available_bytes)} available ({self.source}) "
            f"- KV cache {ranks}{format_bytes(self.kv_bytes)} ({self.kv_note}) "
            f"- working memory {format_bytes(self.working_bytes)} (safety margin: {WORKING_SHARE:.0%} of what is "
            f"available, at least {format_bytes(WORKING_MIN_BYTES)}) = {format_bytes(self.budget_bytes)}"
        )


def kv_bytes_when_unset(requested_bytes: int, resident_bytes: int) -> int:
    """KV cache auto leaves room for when vLLM sizes it itself: a share of its requested memory not yet used."""
    return int(KV_SHARE_WHEN_UNSET * max(0, requested_bytes - resident_bytes))


def choose_auto_budget(view: MemoryView, kv_bytes: int, tp_size: int = 1, kv_note: str = "") -> AutoBudget:
    """The largest size budget (all ranks) that leaves every rank's KV cache and the working memory room.

    Never negative: 0 when nothing is left, which the slot plan then refuses
    as below the minimum, with this arithmetic in the message.
    """
    if tp_size < 1 or kv_bytes < 0:
        raise ValueError(f"tp_size {tp_size} and kv_bytes {kv_bytes} must be positive")
    available = max(0, view.available_bytes)
    working = max(WORKING_MIN_BYTES, int(WORKING_SHARE * available))
    budget = max(0, available - tp_size * kv_bytes - working)
    return AutoBudget(budget, available, kv_bytes, working, tp_size, view.source, kv_note)
