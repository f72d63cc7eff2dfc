"""How many leading MoE layers Fate keeps fully resident: the count that loads fewest experts per token.

A resident layer never misses, but its slots come out of the same budget as
everyone else's: each extra resident layer takes ``num_experts - s`` more slots
than an offloaded one, which every later layer pays for with fewer slots (the
plan splits the rest evenly). The rule weighs the two with a model of each
layer's misses, from what a saved activation profile holds:

* **demand**: ``q[l][e]``, the probability that a token needs expert ``e`` at
  layer ``l`` (the profile's marginal counts, scaled to sum to ``top_k``);
* **misses of ``s`` slots**: an LRU-like cache under independent requests
  (Che's approximation: the characteristic time ``T`` solves
  ``sum_e 1 - exp(-q_e T) = s``, and a token misses ``sum_e q_e exp(-q_e T)``
  experts). Real routing has more locality, so this overstates every layer's
  misses alike; the rule only compares splits of one budget;
* **prediction**: a predicted layer's misses that its prefetch covers cost
  only the part of a load that compute does not hide: ``misses * (1 - hidden * recall)``,
  with ``recall`` measured while serving (the profile's optional field) and
  ``hidden`` the share of a predicted load's time that overlaps compute. A
  slow link (a load lasting many layers' compute, as on a CPU host reading a
  disk) hides almost nothing: every load costs its transfer, and recall does
  not matter. Layer 0 is never predicted.

The rule tries every count ``R`` from 1 (layer 0, which nothing predicts; the
caller may allow 0) to the most the budget's plan allows, and keeps the one
with the fewest expected costly loads per token (the fewest resident layers on
a tie). It reads each count's slots from the plan itself, including the
spare slots the plan gives some layers beyond its even split
(:func:`extra_slot_order` says which). No torch, no vLLM.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

#: bisection steps for Che's characteristic time: 2^-60 of the bracket, far below any count's resolution
_BISECTION_STEPS = 60


def layer_demand(counts: np.ndarray, top_k: int) -> np.ndarray:
    """``[L, E]`` marginal counts -> ``[L, E]`` probability that a token needs each expert (rows sum to top_k).

    A layer the profile never saw gets uniform demand (nothing known favours an expert).
    """
    counts = np.asarray(counts, dtype=np.float64)
    totals = counts.sum(axis=1, keepdims=True)  # [L, 1]
    uniform = np.full_like(counts, top_k / counts.shape[1])
    demand = np.where(totals > 0, top_k * counts / np.where(totals > 0, totals, 1), uniform)
    return np.minimum(demand, 1.0)  # an expert is needed at most once per token


def lru_misses_per_token(demand: Sequence[float], slots: int) -> float:
    """Expected experts a token misses in an LRU cache of ``slots`` experts (Che's approximation).

    ``demand[e]``: probability that a token needs expert ``e`` (independent tokens).
    0 when the slots hold every expert that is ever needed.
    """
    q = np.asarray(demand, dtype=np.float64)
    q = q[q > 0]
    if slots >= len(q):
        return 0.0
    if slots <= 0:
        return float(q.sum())

    def occupied(t: float) -> float:
        return float(np.sum(-np.expm1(-q * t)))

    lo, hi = 0.0, 1.0
    while occupied(hi) < slots:
        hi *= 2
    for _ in range(_BISECTION_STEPS):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if occupied(mid) < slots else (lo, mid)
    return float(np.sum(q * np.exp(-q * hi)))


def expected_loads(
    demand: np.ndarray, layer_slots: Sequence[int], recall: Sequence[float | None] | None = None, hidden: float = 0.0,
) -> list[float]:
    """Costly loads per token of each layer under ``layer_slots`` (0 for a layer holding every expert).

    ``recall[l]`` (None or NaN: not measured, counts as 0) and ``hidden`` as in the module docstring.
    """
    num_experts = demand.shape[1]
    out = []
    for layer, slots in enumerate(layer_slots):
        if slots >= num_experts:
            out.append(0.0)
            continue
        misses = lru_misses_per_token(demand[layer], slots)
        r = recall[layer] if recall is not None and layer > 0 else None
        r = 0.0 if r is None or math.isnan(r) else float(r)
        out.append(misses * (1.0 - hidden * r))
    return out


@dataclass(frozen=True)
class ResidentChoice:
    """The chosen count and, for each count tried, the expected costly loads per token."""

    resident_layers: int
    loads_by_count: dict[int, float]

    def describe(self) -> str:
        return ", ".join(f"{r}: {v:.3f}" for r, v in sorted(self.loads_by_count.items()))


def choose_resident_layers(
    demand: np.ndarray, layer_slots_of: Callable[[int], Sequence[int]], recall: Sequence[float | None] | None = None,
    hidden: float = 0.0, min_resident: int = 1,
) -> ResidentChoice:
    """The number of leading layers to keep resident with the fewest expected costly loads per token.

    ``demand``: ``[L, E]`` from :func:`layer_demand`. ``layer_slots_of(R)``: the
    budget's per-layer slots when ``R`` leading layers are asked to be resident
    (the planner may give fewer: counts past the first it refuses are not tried,
    and when it refuses ``min_resident`` already, its own split is the answer).
    Counts from ``min_resident`` (Fate: 1, layer 0 is never predicted) up.
    """
    num_layers, num_experts = demand.shape
    loads: dict[int, float] = {}
    for count in range(min_resident, num_layers):
        slots = list(layer_slots_of(count))
        resident = next((i for i, n in enumerate(slots) if n < num_experts), len(slots))
        if resident < count:
            if not loads:  # the budget cannot keep even the fewest layers whole: its own split
                loads[resident] = sum(expected_loads(demand, slots, recall, hidden))
            break
        loads[count] = sum(expected_loads(demand, slots, recall, hidden))
    if not loads:  # a single layer (nothing to split) or min_resident past the last layer
        return ResidentChoice(min(min_resident, num_layers), {})
    best = min(loads, key=lambda r: (round(loads[r], 9), r))
    return ResidentChoice(best, loads)


def extra_slot_order(demand: np.ndarray) -> Callable[[int], list[int]]:
    """For ``plan_slots(extra_order=...)``: the layers an extra slot saves most misses per token first.

    ``demand``: ``[L, E]`` from :func:`layer_demand`. With ``base`` slots in every
    offloaded layer, layer ``l`` gains ``misses(l, base) - misses(l, base + 1)``
    (Che's approximation): a layer whose tokens spread over more experts gains
    more than one that keeps returning to a few. Ties keep layer order.
    """
    def order(base: int) -> list[int]:
        gain = [lru_misses_per_token(row, base) - lru_misses_per_token(row, base + 1) for row in demand]
        return sorted(range(len(gain)), key=lambda layer: (-round(gain[layer], 9), layer))

    return order
