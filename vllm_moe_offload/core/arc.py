"""Adaptive Replacement Cache (Megiddo and Modha, FAST '03) over one layer's expert slots.

Fate caches each deep layer's experts with ARC: a recency list ``T1`` (seen
once), a frequency list ``T2`` (seen again), ghost lists ``B1``/``B2`` of
recently evicted ids, and a target size ``p`` for ``T1`` that moves toward
whichever ghost list keeps getting hits.

Edge cases, as part of the contract:

* pinned experts (needed by the pass being prepared) are never chosen; when the
  list ARC prefers holds only pinned experts, the other list gives the victim;
* resident experts ARC never heard of (warm-loaded) are evicted before any other;
* ghost lists hold at most ``capacity`` ids together with their resident list;
* a prefetch spares (:meth:`ARCPolicy.useful`) experts in ``T2`` and those the last step used.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection

from vllm_moe_offload.core.cache import ReplacementPolicy


class ARCPolicy(ReplacementPolicy):
    name = "arc"

    def __init__(self, num_experts: int, capacity: int) -> None:
        super().__init__(num_experts, capacity)
        self.p = 0.0  # target size of T1
        self.t1: OrderedDict[int, None] = OrderedDict()  # LRU first
        self.t2: OrderedDict[int, None] = OrderedDict()
        self.b1: OrderedDict[int, None] = OrderedDict()
        self.b2: OrderedDict[int, None] = OrderedDict()
        self._incoming: int | None = None
        self._ghost: str | None = None  # which ghost list the incoming expert came from

    def before_admit(self, expert: int) -> None:
        """Adapt ``p`` on a ghost hit before the victim is chosen (ARC's cases II and III)."""
        self._incoming, self._ghost = expert, None
        if expert in self.b1:
            self.p = min(float(self.capacity), self.p + max(len(self.b2) / len(self.b1), 1.0))
            del self.b1[expert]
            self._ghost = "b1"
        elif expert in self.b2:
            self.p = max(0.0, self.p - max(len(self.b1) / len(self.b2), 1.0))
            del self.b2[expert]
            self._ghost = "b2"

    #: ARC's own notion of value is T2; recency adds the experts the last step used
    useful_steps = 1

    def useful(self, expert: int, steps_since_use: int | None) -> bool:
        """In the frequency list ``T2`` (wanted again since it entered), or used by the last step."""
        return expert in self.t2 or super().useful(expert, steps_since_use)

    def choose_victim(self, resident: Collection[int], pinned: Collection[int]) -> int:
        for expert in resident:
            if expert not in self.t1 and expert not in self.t2 and expert not in pinned:
                return expert
        from_t1 = [e for e in self.t1 if e in resident and e not in pinned]
        from_t2 = [e for e in self.t2 if e in resident and e not in pinned]
        prefer_t1 = len(self.t1) > 0 and (
            len(self.t1) > self.p or (self._ghost == "b2" and len(self.t1) == int(self.p))
        )
        if (prefer_t1 and from_t1) or not from_t2:
            return from_t1[0]
        return from_t2[0]

    def on_evict(self, expert: int) -> None:
        if expert in self.t1:
            del self.t1[expert]
            self.b1[expert] = None
        elif expert in self.t2:
            del self.t2[expert]
            self.b2[expert] = None
        self._trim_ghosts()

    def on_access(self, expert: int, hit: bool) -> None:
        if expert in self.t1 or expert in self.t2:
            self.t1.pop(expert, None)
            self.t2.pop(expert, None)
            self.t2[expert] = None  # seen again: frequency list, MRU end
        elif self._ghost is not None and expert == self._incoming:
            self.t2[expert] = None  # a ghost hit: it was wanted again after leaving
        else:
            self.b1.pop(expert, None)
            self.b2.pop(expert, None)
            self.t1[expert] = None
        self._incoming, self._ghost = None, None
        self._trim_ghosts()

    def _trim_ghosts(self) -> None:
        while len(self.t1) + len(self.b1) > self.capacity and self.b1:
            self.b1.popitem(last=False)
        while len(self.t1) + len(self.t2) + len(self.b1) + len(self.b2) > 2 * self.capacity and self.b2:
            self.b2.popitem(last=False)
