"""Belady's optimal cache (MIN) for one layer, when each pass needs a set of experts.

Given the whole future, evict the resident expert that the current pass does not
need and whose next use is farthest (never used again counts as infinitely far).
With step-wise set accesses this is still optimal: it minimises the number of
loads of any demand cache with the same capacity that starts empty, so its hit
rate is the ceiling of every replacement policy (and its load count the floor
of any cache that also prefetches). ``tests/core`` checks it against a brute
force search.

:class:`BeladyPolicy` runs through the same :class:`SlotMap` as the other
policies; :func:`belady_misses` is the same algorithm without one, for checks.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Collection, Sequence

import numpy as np

from vllm_moe_offload.core.cache import ReplacementPolicy

#: next use of an expert never needed again
NEVER = np.iinfo(np.int64).max


def next_use_table(accesses: Sequence[Collection[int]], num_experts: int) -> np.ndarray:
    """``[P + 1, E]``: row ``p`` holds each expert's first pass at or after ``p``.

    Row ``P`` (past the end) and experts never needed again hold ``NEVER``.
    """
    table = np.full((len(accesses) + 1, num_experts), NEVER, dtype=np.int64)
    for p in range(len(accesses) - 1, -1, -1):
        table[p] = table[p + 1]
        table[p, list(accesses[p])] = p
    return table


class ClairvoyantPolicy(ReplacementPolicy):
    """A policy that knows the future: the replay tells it which pass runs now."""

    @abstractmethod
    def begin_pass(self, index: int) -> None:
        """The pass at ``index`` of the access list given at construction starts."""


class BeladyPolicy(ClairvoyantPolicy):
    """MIN over a known list of per-pass expert sets (one layer, one cache).

    ``accesses[p]`` is the set of experts pass ``p`` needs, in replay order; the
    replay must call ``begin_pass(p)`` before pass ``p``. Experts of the current
    pass count as used now (distance 0), so they leave last even when unpinned.
    Ties (same next use) go to the higher expert id, which does not change the
    number of misses.
    """

    name = "belady"

    def __init__(self, num_experts: int, capacity: int, accesses: Sequence[Collection[int]]) -> None:
        super().__init__(num_experts, capacity)
        self._next_use = next_use_table(accesses, num_experts)
        self._now = 0

    def begin_pass(self, index: int) -> None:
        if not 0 <= index < len(self._next_use):
            raise IndexError(f"pass {index} is outside the {len(self._next_use) - 1} known passes")
        self._now = index

    def on_access(self, expert: int, hit: bool) -> None:
        pass

    def on_evict(self, expert: int) -> None:
        pass

    def choose_victim(self, resident: Collection[int], pinned: Collection[int]) -> int:
        upcoming = self._next_use[self._now]
        candidates = [e for e in resident if e not in pinned]
        return max(candidates, key=lambda e: (upcoming[e], e))


def belady_misses(accesses: Sequence[Collection[int]], num_experts: int, capacity: int) -> int:
    """Misses of MIN with ``capacity`` slots over ``accesses``, starting empty.

    Each pass's distinct experts must all fit: raises ``ValueError`` otherwise.
    """
    upcoming = next_use_table(accesses, num_experts)
    resident: set[int] = set()
    misses = 0
    for p, needed in enumerate(accesses):
        needed = set(needed)
        if len(needed) > capacity:
            raise ValueError(f"pass {p} needs {len(needed)} experts, more than {capacity} slots")
        for expert in needed - resident:
            if len(resident) == capacity:
                victim = max(resident - needed, key=lambda e: (upcoming[p + 1, e], e))
                resident.remove(victim)
            resident.add(expert)
            misses += 1
    return misses
