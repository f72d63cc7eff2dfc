"""Klotski's constraint-sensitive I/O-compute planner, as a pure function. No torch, no vLLM.

Klotski (ASPLOS '25, section 7) groups ``n`` batches so that every expert
loaded for a MoE layer serves the tokens of all ``n``: attention, norms and
the router run batch by batch while the router's and the ``K`` hot experts'
weights of the layer load; after each batch's router the other (cold) experts
the group selected load on demand; the MoE layer then runs expert by expert,
hot experts first. The plan is bubble-free when four overlap inequalities hold
(paper, eq. 4-7), written per MoE layer:

====  ===========================================================  =====================
eq.   paper                                                        pipeline point
====  ===========================================================  =====================
(4)   n t_cA >= t_IO_G                                             router start
(5)   n (t_cA + t_cG) >= t_IO_G + K t_IO_E                          hot-expert start
(6)   n (t_cA + t_cG) + t_c_hotE >= t_IO_G + (K + 1) t_IO_E         first cold-expert start
(7)   n (t_cA + t_cG) + t_c_hotE + sum_Q t_cE >= t_IO_G             next layer's attention
      + (K + len(Q)) t_IO_E + t_IO_A
====  ===========================================================  =====================

Paper notation mapped to ``KlotskiCosts`` (all per MoE layer, milliseconds):

* ``t_cA`` attention of one batch of ``bs`` tokens: ``attn_ms_fixed + attn_ms_per_token * bs``;
* ``t_cG`` router of one batch: ``gate_ms_per_token * bs``;
* ``t_IO_E`` one expert's transfer: ``expert_load_ms``; ``t_IO_G`` and
  ``t_IO_A`` the router's and attention's transfers: ``gate_load_ms`` and
  ``attn_load_ms`` (0 here: the plugin keeps them resident);
* ``t_c_hotE`` the hot experts' compute over the group's ``n * bs`` tokens and
  ``sum_Q t_cE`` the cold experts': ``expert_ms_fixed`` per expert plus
  ``expert_ms_per_token`` per routed token; the hot experts serve a share
  ``min(1, K * hot_precision / D)`` of the ``n * bs * top_k`` routings;
* ``len(Q)`` the cold queue: ``max(0, D - K)``, where ``D`` is the expected
  number of distinct experts the group needs (default: uniform routing,
  ``E (1 - (1 - top_k / E) ** (n bs))``; pass a measured ``distinct_experts``).

Choice (``plan_klotski``): for ``n = 1, 2, ...`` up to the bound
``min(max_group, kv_max_seqs // batch_size)``, ``K`` is the most hot experts
whose loads eq. 5 hides, capped by the budget (``slots - reserve_slots``: a
cold load needs a free slot while the hot experts compute), by ``num_experts``
and by ``max(top_k, floor(D))`` (more would be wasted). The first ``n`` where
eq. 4-7 all hold is taken (Klotski's "smallest n": larger ones only inflate the
KV cache). When no ``n`` up to the bound does, the plan takes the bound, the
capped ``K``, and a prefetch depth ``ceil((t_IO_G + K t_IO_E) / (n (t_cA + t_cG)))``
(at most ``max_depth``): hot experts are then fetched that many layers ahead so
their loads still fit in attention windows; the remaining bubble is reported.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

#: Klotski's best results used n = 15; beyond ~16 groups the KV cost and the
#: wait of the group's first request outweigh the shared loads (paper, Fig. 14).
DEFAULT_MAX_GROUP = 16

#: the correlation table predicts one layer ahead; two lets hot loads use the
#: previous layer's attention window too without chaining predictions further.
DEFAULT_MAX_DEPTH = 2

#: slack in ms below which an inequality counts as met (float noise)
_EPS_MS = 1e-9


@dataclass(frozen=True)
class KlotskiCosts:
    """Measured per-MoE-layer costs, in milliseconds (see the module docstring for the mapping)."""

    attn_ms_per_token: float
    expert_ms_per_token: float
    expert_load_ms: float
    attn_ms_fixed: float = 0.0
    gate_ms_per_token: float = 0.0
    expert_ms_fixed: float = 0.0
    gate_load_ms: float = 0.0
    attn_load_ms: float = 0.0
    #: share of prefetched hot experts that the group uses (Klotski measured 1.0)
    hot_precision: float = 1.0

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite time >= 0, got {value}")
        if not 0.0 <= self.hot_precision <= 1.0:
            raise ValueError(f"hot_precision must lie in [0, 1], got {self.hot_precision}")


@dataclass(frozen=True)
class KlotskiLimits:
    """What bounds the plan: model geometry, expert budget and KV cache."""

    num_experts: int
    top_k: int
    #: expert slots of one MoE layer (the budget)
    slots: int
    #: sequences whose KV cache fits at once; a group of n batches needs n * batch_size
    kv_max_seqs: int
    max_group: int = DEFAULT_MAX_GROUP
    max_depth: int = DEFAULT_MAX_DEPTH
    #: slots kept free for on-demand (cold) loads while hot experts compute
    reserve_slots: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"need 1 <= top_k <= num_experts, got top_k={self.top_k}, num_experts={self.num_experts}")
        if self.slots < self.top_k:
            raise ValueError(f"slots ({self.slots}) must be at least top_k ({self.top_k}): a token could not run")
        for name in ("kv_max_seqs", "max_group", "max_depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.reserve_slots < 0:
            raise ValueError(f"reserve_slots must be >= 0, got {self.reserve_slots}")


#: why the plan stopped growing n: the inequalities hold, or a bound was hit first
LIMITERS = ("overlap", "kv", "max_group")


@dataclass(frozen=True)
class KlotskiPlan:
    """The chosen group size, hot experts and depth, and why (all times per MoE layer, ms)."""

    group_size: int  # n
    hot_experts: int  # K
    prefetch_depth: int
    batch_size: int  # bs
    distinct_experts: float  # D, for the group's n * bs tokens
    cold_experts: float  # len(Q)
    limiter: str  # one of LIMITERS
    slack_ms: tuple[float, float, float, float]  # left minus right side of eq. 4-7
    compute_ms: float  # n (t_cA + t_cG) + t_c_hotE + sum_Q t_cE
    io_ms: float  # t_IO_G + (K + len(Q)) t_IO_E + t_IO_A

    @property
    def overlapped(self) -> bool:
        """All four inequalities hold: no bubble in the layer."""
        return all(s >= -_EPS_MS for s in self.slack_ms)

    @property
    def bubble_ms(self) -> float:
        """Idle compute per MoE layer left by loads (0 when overlapped)."""
        return max(0.0, -min(self.slack_ms))

    @property
    def tokens_per_group(self) -> int:
        return self.group_size * self.batch_size

    def describe(self) -> str:
        """One line for logs and statistics."""
        state = "overlapped" if self.overlapped else f"bubble {self.bubble_ms:.3g} ms/layer"
        return (
            f"klotski plan: n={self.group_size} x bs={self.batch_size} ({self.tokens_per_group} tokens), "
            f"K={self.hot_experts} hot of ~{self.distinct_experts:.1f} needed, depth {self.prefetch_depth}; "
            f"compute {self.compute_ms:.3g} ms vs I/O {self.io_ms:.3g} ms per layer; {state}; "
            f"limited by {self.limiter}"
        )


def uniform_distinct_experts(tokens: int, num_experts: int, top_k: int) -> float:
    """Expected distinct experts ``tokens`` tokens need when each picks ``top_k`` of ``num_experts`` uniformly."""
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** tokens)


def plan_klotski(
    costs: KlotskiCosts,
    limits: KlotskiLimits,
    batch_size: int,
    distinct_experts: Callable[[int], float] | None = None,
) -> KlotskiPlan:
    """Choose n, K and the prefetch depth for a live batch of ``batch_size`` tokens (rules: module docstring).

    ``distinct_experts(tokens)`` estimates D (default ``uniform_distinct_experts``).
    Raises ``ValueError`` for ``batch_size`` < 1 (an empty step needs no plan).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1 token, got {batch_size}")
    kv_bound = max(1, limits.kv_max_seqs // batch_size)
    n_max = min(limits.max_group, kv_bound)
    bound = "kv" if kv_bound < limits.max_group else "max_group"
    for n in range(1, n_max + 1):
        window = n * _batch_ms(costs, batch_size)
        k_cap = _k_cap(limits, batch_size * n, distinct_experts)
        for depth in range(1, limits.max_depth + 1):  # the shallowest prefetch that hides the loads
            k = k_cap
            if costs.expert_load_ms > 0:  # the most hot loads eq. 5 hides in `depth` windows
                fits = (depth * window - costs.gate_load_ms) / costs.expert_load_ms + _EPS_MS
                k = k if fits >= k else max(0, math.floor(fits))
            plan = _evaluate(costs, limits, batch_size, n, k, depth, "overlap", distinct_experts)
            if plan.overlapped:
                return plan
    k = _k_cap(limits, batch_size * n_max, distinct_experts)
    window = n_max * _batch_ms(costs, batch_size)
    hot_io = costs.gate_load_ms + k * costs.expert_load_ms
    ratio = hot_io / window if window > 0 else math.inf  # windows the hot loads need
    depth = limits.max_depth if ratio > limits.max_depth else max(1, math.ceil(ratio - _EPS_MS))
    return _evaluate(costs, limits, batch_size, n_max, k, depth, bound, distinct_experts)


def _batch_ms(costs: KlotskiCosts, batch_size: int) -> float:
    """t_cA + t_cG of one batch."""
    return costs.attn_ms_fixed + (costs.attn_ms_per_token + costs.gate_ms_per_token) * batch_size


def _distinct(limits: KlotskiLimits, tokens: int, fn: Callable[[int], float] | None) -> float:
    d = fn(tokens) if fn is not None else uniform_distinct_experts(tokens, limits.num_experts, limits.top_k)
    return float(min(limits.num_experts, max(float(limits.top_k), d)))


def _k_cap(limits: KlotskiLimits, tokens: int, fn: Callable[[int], float] | None) -> int:
    wanted = max(limits.top_k, math.floor(_distinct(limits, tokens, fn) + _EPS_MS))
    return max(0, min(limits.num_experts, limits.slots - limits.reserve_slots, wanted))


def _evaluate(
    costs: KlotskiCosts, limits: KlotskiLimits, batch_size: int, n: int, k: int, depth: int, limiter: str,
    fn: Callable[[int], float] | None,
) -> KlotskiPlan:
    tokens = n * batch_size
    distinct = _distinct(limits, tokens, fn)
    cold = max(0.0, distinct - k)
    routings = tokens * limits.top_k
    hot_share = min(1.0, k * costs.hot_precision / distinct)
    hot_ms = k * costs.expert_ms_fixed + costs.expert_ms_per_token * routings * hot_share
    cold_ms = cold * costs.expert_ms_fixed + costs.expert_ms_per_token * routings * (1.0 - hot_share)
    attn_ms = n * (costs.attn_ms_fixed + costs.attn_ms_per_token * batch_size)
    front_ms = n * _batch_ms(costs, batch_size)
    # Hot loads started ``depth`` layers ahead have ``depth`` attention windows to hide in.
    hot_window_ms = depth * front_ms
    io_g, io_e = costs.gate_load_ms, costs.expert_load_ms
    slack = (
        attn_ms - io_g,
        hot_window_ms - (io_g + k * io_e),
        (front_ms + hot_ms - (io_g + (k + 1) * io_e)) if cold > 0 else math.inf,
        front_ms + hot_ms + cold_ms - (io_g + (k + cold) * io_e + costs.attn_load_ms),
    )
    return KlotskiPlan(
        group_size=n, hot_experts=k, prefetch_depth=depth, batch_size=batch_size, distinct_experts=distinct,
        cold_experts=cold, limiter=limiter, slack_ms=slack, compute_ms=front_ms + hot_ms + cold_ms,
        io_ms=io_g + (k + cold) * io_e + costs.attn_load_ms,
    )
