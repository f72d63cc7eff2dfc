"""The link as the scheduled resource: one queue of expert loads per tier, and who may join it.

No torch, no vLLM. The transfer engine (``runtime/transfer.py``) keeps one
:class:`LoadQueue` for its tier; the slot pools (``runtime/slots.py``) ask
:func:`admit_prefetches` before they queue a guess. The rules (issue 17, after
MoE-Infinity's admission control):

* **Demand loads first.** A load a layer waits for now runs before any
  prefetch still queued; prefetches run nearest layer first, most confident
  first within a layer. A load already running is never interrupted.
* **A prefetch is admitted only while the link would otherwise idle** before
  the layer that needs it runs: the prefetch bytes already queued or running,
  over the measured bandwidth, must take less than the measured compute of the
  layers until then. The current layer's own demand loads do not count: the
  target layer waits for them either way (the current layer cannot finish
  without them).
* **Stale prefetches are dropped.** A nearer prediction of a layer replaces a
  farther one; its queued loads that the nearer one does not want are
  cancelled (``LayerSlots.prefetch``); a queued load that was cancelled is
  skipped by the queue and no longer counts as backlog.
* **A prefetch never evicts an expert scored above it** (:func:`outranking`):
  residents the same prediction scores at least as high stay.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from vllm_moe_offload.core.cache import pack_passes

T = TypeVar("T")


@dataclass(frozen=True)
class LoadPriority:
    """Where one load stands in its tier's queue.

    ``demand``: a layer waits for it now. ``needed_at``: the layer clock
    (:class:`LayerClock.layers`) at which the layer that needs it runs; a
    demand load's is the current one. ``confidence``: the prediction's score
    for the expert (higher runs first). ``num_bytes``: what it reads, for the
    backlog (0 when unknown).
    """

    demand: bool = True
    needed_at: int = 0
    confidence: float = 1.0
    num_bytes: int = 0

    def key(self) -> tuple[int, int, float]:
        """Sort key, smallest first: demand before prefetch, then the nearest layer, then the most confident."""
        return (0 if self.demand else 1, self.needed_at if not self.demand else 0, -self.confidence)


#: what a load submitted without a priority is: a miss some layer waits for
DEMAND = LoadPriority()


class LoadQueue(Generic[T]):
    """Loads waiting for an I/O lane, popped by :meth:`LoadPriority.key` (ties: first come first).

    ``cancelled(item)`` tells whether a queued item was withdrawn (its slot
    pool dropped the stale guess); such items are skipped by :meth:`pop` and
    left out of :meth:`queued_prefetch_bytes`. Not thread-safe: the engine
    holds its lock around every call.
    """

    def __init__(self, cancelled: Callable[[T], bool] = lambda item: False) -> None:
        self._heap: list[tuple[tuple[int, int, float], int, LoadPriority, T]] = []
        self._seq = itertools.count()
        self._cancelled = cancelled

    def push(self, item: T, priority: LoadPriority = DEMAND) -> None:
        heapq.heappush(self._heap, (priority.key(), next(self._seq), priority, item))

    def pop(self, demand_only: bool = False) -> tuple[LoadPriority, T] | None:
        """The most urgent live item and its priority; None when none is left (or, ``demand_only``,
        when the most urgent is a prefetch: it stays queued)."""
        while self._heap:
            _, _, priority, item = self._heap[0]
            if self._cancelled(item):
                heapq.heappop(self._heap)
                continue
            if demand_only and not priority.demand:
                return None
            heapq.heappop(self._heap)
            return priority, item
        return None

    def __len__(self) -> int:
        return sum(1 for *_, item in self._heap if not self._cancelled(item))

    def __bool__(self) -> bool:
        """Whether anything is queued, live or withdrawn (cheap: withdrawn items are not looked at)."""
        return bool(self._heap)

    def queued_prefetch_bytes(self) -> int:
        """Bytes of the live prefetches still queued."""
        return sum(p.num_bytes for _, _, p, item in self._heap if not p.demand and not self._cancelled(item))

    def drain(self) -> list[T]:
        """Remove and return every queued item (live or not), in no particular order."""
        items = [item for *_, item in self._heap]
        self._heap.clear()
        return items


class LinkRate:
    """The tier's measured read bandwidth, bytes per second per I/O lane, smoothed over loads."""

    #: weight of the newest load: about the last ten loads count (one slow read must not halve the estimate)
    alpha = 0.1

    def __init__(self) -> None:
        self.bytes_per_s: float | None = None

    def add(self, num_bytes: int, took_s: float) -> None:
        if num_bytes <= 0 or took_s <= 0:
            return
        rate = num_bytes / took_s
        self.bytes_per_s = rate if self.bytes_per_s is None else (1 - self.alpha) * self.bytes_per_s + self.alpha * rate

    def seconds(self, num_bytes: int) -> float | None:
        """How long ``num_bytes`` take on one lane; None until a load was measured."""
        return None if not self.bytes_per_s else num_bytes / self.bytes_per_s


class LayerClock:
    """Counts MoE layers as they start and measures the compute between two starts.

    ``tick(now_s, stall_s)``: a MoE layer starts at ``now_s``; ``stall_s`` of the
    time since the previous start was spent waiting for loads (not compute: the
    link was busy then). The compute per layer is the rest, smoothed; periods
    longer than ``max_period_s`` (the engine idle between requests) are not
    compute and are left out.
    """

    #: weight of the newest period: the layers of one step are alike, and a step of another size (a
    #: prefill after decodes) must move the estimate within two or three layers
    alpha = 0.5
    #: a longer period is the engine idle between requests, not compute
    max_period_s = 1.0

    def __init__(self) -> None:
        self.layers = 0
        self.compute_s: float | None = None
        self._last_s: float | None = None

    def tick(self, now_s: float, stall_s: float = 0.0) -> int:
        if self._last_s is not None:
            period = now_s - self._last_s
            if 0 <= period <= self.max_period_s:
                compute = max(0.0, period - stall_s)
                ema = self.compute_s
                self.compute_s = compute if ema is None else (1 - self.alpha) * ema + self.alpha * compute
        self._last_s = now_s
        self.layers += 1
        return self.layers


def admit_prefetches(
    candidates: Sequence[int], num_bytes: int, distance: int, backlog_bytes: int,
    rate: LinkRate, compute_s: float | None, lanes: int = 1, minimum: int = 0,
) -> int:
    """How many of ``candidates`` (most confident first) may be queued for a layer ``distance`` ahead.

    Admitted one by one while the link would still idle before that layer
    runs: the prefetch bytes ahead of the candidate (``backlog_bytes``, already
    queued or running, plus the candidates admitted so far) take less than
    ``distance x compute_s`` on ``lanes`` I/O lanes at the measured ``rate``.
    The candidate itself need not fit: it started while the link was free, and
    whatever part of it lands before the layer is stall saved. Until the rate
    and the compute are measured every candidate is admitted (the first steps
    measure them). ``minimum``: admitted regardless (0 for the rule as stated).
    """
    if not candidates:
        return 0
    per_load_s = rate.seconds(num_bytes)
    if per_load_s is None or compute_s is None:
        return len(candidates)
    window_s = distance * compute_s * lanes
    backlog_s = rate.seconds(backlog_bytes) or 0.0
    admitted = 0
    for _ in candidates:
        if admitted >= minimum and backlog_s >= window_s:
            break
        admitted += 1
        backlog_s += per_load_s
    return admitted


def outranking(score: float, resident: Iterable[int], scores: Mapping[int, float] | Sequence[float]) -> set[int]:
    """Residents a prefetch scored ``score`` must not evict: those the same prediction scores at least as high."""
    return {e for e in resident if _score(scores, e) >= score}


def _score(scores: Mapping[int, float] | Sequence[float], expert: int) -> float:
    if isinstance(scores, Mapping):
        return scores.get(expert, float("-inf"))
    return scores[expert] if 0 <= expert < len(scores) else float("-inf")


def first_pass(rows: Sequence[Sequence[int]], num_slots: int, resident: Iterable[int] = ()) -> list[int]:
    """The experts of the pass a layer runs first for token ``rows`` (each token's experts), most needed first.

    What a prefill's next layer should load while this one computes (issue 17,
    overlap in prefill): the layer splits its tokens into passes of at most
    ``num_slots`` experts, planned from what is resident or already loading
    (``core/cache.pack_passes``), and runs them in the planned order, whose
    first pass needs the fewest experts that are not ``resident``; so loading
    that pass's experts ahead keeps it the one that runs first. When every
    expert fits at once, that is all of them.
    """
    if not rows:
        return []
    passes = pack_passes(rows, num_slots, resident=set(resident))
    uses: dict[int, int] = {}
    for i in passes[0]:
        for e in rows[i]:
            uses[e] = uses.get(e, 0) + 1
    return sorted(uses, key=lambda e: (-uses[e], e))
