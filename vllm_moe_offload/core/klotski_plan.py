"""Klotski's constraint-sensitive I/O-compute planner (a pure function), its cost fit and chained prediction.

No torch, no vLLM.

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
  ``E (1 - (1 - top_k / E) ** (n bs))``; pass a measured ``distinct_experts``);
* ``moe_ms_fixed``: a MoE layer's time per step whatever its experts, counted
  with the hot experts (they compute first).

Hot loads issued: only ``min(K, spare_slots)`` of the ``K`` hot experts are
loaded ahead (``spare_slots``: slots a prefetch may fill without evicting an
expert the cache deems useful; the others stay as cached), so eq. 5-7 count
those on the link, and a prefetch that issues none needs no depth.

Measured costs: :class:`StepCostFit` fits each per-layer time as a line in the
step's tokens over past steps, the first steps after start-up (warm-up) left
out; :func:`measured_costs` maps the lines onto the terms above. Chained
prediction for a depth above 1: :func:`hot_ahead`.

Choice (``plan_klotski``): for ``n = 1, 2, ...`` up to the bound
``min(max_group, kv_max_seqs // batch_size)``, ``K`` is the most hot experts
whose loads eq. 5 hides, capped by the budget (``slots - reserve_slots``: a
cold load needs a free slot while the hot experts compute), by ``num_experts``
and by ``max(top_k, floor(D))`` (more would be wasted). The first ``n`` where
eq. 4-7 all hold is taken (Klotski's "smallest n": larger ones only inflate the
KV cache); for each ``n`` the depths ``1 .. max_depth`` are tried, shallowest
first (``depth`` attention windows for eq. 5). When no ``n`` up to the bound
does, the plan takes the bound, the
capped ``K``, and a prefetch depth ``ceil((t_IO_G + K' t_IO_E) / (n (t_cA + t_cG)))``
(``K'`` the hot loads issued; at least 1, at most ``max_depth``): hot experts
are then fetched that many layers ahead so their loads still fit in attention
windows; the remaining bubble is reported.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from vllm_moe_offload.core.correlation import CorrelationTable

#: Klotski's best results used n = 15; beyond ~16 groups the KV cost and the
#: wait of the group's first request outweigh the shared loads (paper, Fig. 14).
DEFAULT_MAX_GROUP = 16

#: how many layers ahead hot experts may be fetched unless the caller says otherwise (the routing
#: observer caps it by its I/O lanes and the layers left); predictions chained further get worse
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
    #: per MoE layer and step whatever the experts (kernel set-up, routing bookkeeping); counted
    #: with the hot experts, which compute first
    moe_ms_fixed: float = 0.0
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
    #: slots a prefetch may fill without evicting an expert the cache deems useful (free ones
    #: and those of experts not used lately); None: all of them. Only that many hot loads are
    #: issued ahead, so only they need the attention windows of a deeper prefetch (eq. 5).
    spare_slots: int | None = None

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
        if self.spare_slots is not None and self.spare_slots < 0:
            raise ValueError(f"spare_slots must be >= 0, got {self.spare_slots}")

    def issued(self, hot_experts: int) -> int:
        """Hot loads a prefetch of ``hot_experts`` starts: those that find a spare slot."""
        return hot_experts if self.spare_slots is None else min(hot_experts, self.spare_slots)


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
    io_ms: float  # t_IO_G + (K' + len(Q)) t_IO_E + t_IO_A
    hot_loads: int = 0  # K': the hot experts a prefetch loads (those that find a spare slot)

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
            f"K={self.hot_experts} hot ({self.hot_loads} loaded ahead) of ~{self.distinct_experts:.1f} needed, "
            f"depth {self.prefetch_depth}; "
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
                k = k if fits >= limits.issued(k) else max(0, math.floor(fits))
            plan = _evaluate(costs, limits, batch_size, n, k, depth, "overlap", distinct_experts)
            if plan.overlapped:
                return plan
    k = _k_cap(limits, batch_size * n_max, distinct_experts)
    window = n_max * _batch_ms(costs, batch_size)
    hot_io = costs.gate_load_ms + limits.issued(k) * costs.expert_load_ms
    ratio = hot_io / window if window > 0 else (math.inf if hot_io > 0 else 0.0)  # windows the hot loads need
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
    hot_ms = costs.moe_ms_fixed + k * costs.expert_ms_fixed + costs.expert_ms_per_token * routings * hot_share
    cold_ms = cold * costs.expert_ms_fixed + costs.expert_ms_per_token * routings * (1.0 - hot_share)
    attn_ms = n * (costs.attn_ms_fixed + costs.attn_ms_per_token * batch_size)
    front_ms = n * _batch_ms(costs, batch_size)
    # Hot loads started ``depth`` layers ahead have ``depth`` attention windows to hide in.
    hot_window_ms = depth * front_ms
    io_g, io_e = costs.gate_load_ms, costs.expert_load_ms
    issued = limits.issued(k)  # hot experts without a spare slot stay as cached, not loaded
    slack = (
        attn_ms - io_g,
        hot_window_ms - (io_g + issued * io_e),
        (front_ms + hot_ms - (io_g + (issued + 1) * io_e)) if cold > 0 else math.inf,
        front_ms + hot_ms + cold_ms - (io_g + (issued + cold) * io_e + costs.attn_load_ms),
    )
    return KlotskiPlan(
        group_size=n, hot_experts=k, prefetch_depth=depth, batch_size=batch_size, distinct_experts=distinct,
        cold_experts=cold, limiter=limiter, slack_ms=slack, compute_ms=front_ms + hot_ms + cold_ms,
        io_ms=io_g + (issued + cold) * io_e + costs.attn_load_ms, hot_loads=issued,
    )


#: weight of older steps in :class:`StepCostFit`: each new step multiplies the old ones by it, so
#: about the last 20 steps count (prefill sizes seen long ago fade out of the fit)
DEFAULT_FIT_DECAY = 0.95

#: steps after start-up left out of :class:`StepCostFit`: the first run of each layer allocates
#: buffers and chooses kernels, and the first step is a prefill; together they made session 3's
#: planner read 156 ms per layer for 32-token decode steps
DEFAULT_WARMUP_STEPS = 2

#: relative spread of the step sizes seen below which a line cannot be told apart from its
#: intercept: then the fit is the mean time per token (exact at the one size seen)
_MIN_TOKEN_SPREAD = 0.05


class StepCostFit:
    """A per-layer time as ``fixed_ms + per_token_ms * tokens``, fitted online over steps.

    Least squares over ``(tokens of the step, ms)`` samples, older ones weighted
    down by ``decay`` per sample; the first ``warmup_steps`` samples are left
    out. Prefill and decode steps differ in tokens, not in the line, so one fit
    answers for both: the planner asks it at the live step's size instead of
    dividing a smoothed time by tokens of another step. Safeguards: with one step
    size seen (spread below 5%) the fit is proportional (``0 + mean_ms / mean_tokens``);
    a falling line is replaced by the mean time, a negative intercept by the
    line through the origin. No torch.
    """

    def __init__(self, decay: float = DEFAULT_FIT_DECAY, warmup_steps: int = DEFAULT_WARMUP_STEPS) -> None:
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must lie in (0, 1], got {decay}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.decay = decay
        self.warmup_steps = warmup_steps
        self.skipped = 0  # warm-up samples left out so far
        self.samples = 0  # samples in the fit
        self._sums = [0.0] * 5  # weighted sums of 1, x, x^2, y, x y

    def add(self, tokens: int, ms: float) -> None:
        """One step's sample: ``ms`` per layer for a step of ``tokens`` tokens (refused unless finite, >= 0)."""
        if tokens < 1 or not (math.isfinite(ms) and ms >= 0):
            raise ValueError(f"need tokens >= 1 and a finite time >= 0, got {tokens} tokens, {ms} ms")
        if self.skipped < self.warmup_steps:
            self.skipped += 1
            return
        x, y = float(tokens), float(ms)
        self._sums = [self.decay * s + v for s, v in zip(self._sums, (1.0, x, x * x, y, x * y))]
        self.samples += 1

    @property
    def ready(self) -> bool:
        """At least one sample past the warm-up."""
        return self.samples > 0

    def coefficients(self) -> tuple[float, float]:
        """``(fixed_ms, per_token_ms)``, both >= 0; ``(0, 0)`` before any sample."""
        w, sx, sxx, sy, sxy = self._sums
        if w <= 0:
            return 0.0, 0.0
        mean_x, mean_y = sx / w, sy / w
        var_x = max(0.0, sxx / w - mean_x * mean_x)
        if var_x <= (_MIN_TOKEN_SPREAD * mean_x) ** 2:
            return 0.0, mean_y / mean_x
        slope = (sxy / w - mean_x * mean_y) / var_x
        if slope < 0:
            return mean_y, 0.0
        fixed = mean_y - slope * mean_x
        if fixed < 0:
            return 0.0, sxy / sxx
        return fixed, slope

    def predict(self, tokens: int) -> float:
        """The fitted time for a step of ``tokens`` tokens (0 before any sample)."""
        fixed, per_token = self.coefficients()
        return fixed + per_token * tokens


def measured_costs(between: StepCostFit, moe: StepCostFit, top_k: int, expert_load_ms: float) -> KlotskiCosts:
    """The planner's costs from fits of one MoE layer's surroundings and of the layer itself.

    ``between``: the time from one MoE layer's end to the next one's routing
    (attention, norms, router): ``t_cA + t_cG`` of the paper as a line in the
    step's tokens. ``moe``: the MoE layer's own time without waiting for loads:
    its intercept is ``moe_ms_fixed``, its slope per token spread over the
    ``top_k`` routings of a token.
    """
    attn_fixed, attn_per_token = between.coefficients()
    moe_fixed, moe_per_token = moe.coefficients()
    return KlotskiCosts(
        attn_ms_per_token=attn_per_token, attn_ms_fixed=attn_fixed,
        expert_ms_per_token=moe_per_token / top_k, moe_ms_fixed=moe_fixed, expert_load_ms=expert_load_ms,
    )


def tendencies_ahead(table: CorrelationTable, layer_idx: int, prev_topk_ids, distance: int) -> np.ndarray:
    """``[E]`` expected uses of each expert ``distance - 1`` MoE layers after ``layer_idx``.

    At distance 1 it is ``table.tendencies(layer_idx, prev_topk_ids)`` (the
    successors of the step's experts at ``layer_idx - 1``, summed over tokens).
    Each further layer passes the vector through that layer's transition
    (pair counts with rows normalised to 1; an unseen row takes the layer's
    normalised marginal), the same rule one layer on: the step's expected uses
    propagated over the chain of layers. The total stays the step's routings.
    """
    if distance < 1 or layer_idx + distance - 1 >= table.num_layers:
        raise ValueError(f"cannot look {distance} layers from MoE layer {layer_idx - 1} of {table.num_layers}")
    scores = table.tendencies(layer_idx, prev_topk_ids)  # [E]
    for layer in range(layer_idx + 1, layer_idx + distance):
        scores = scores @ table.transition(layer)  # [E] @ [E, E]
    return scores


def hot_ahead(table: CorrelationTable, layer_idx: int, prev_topk_ids, distance: int, k: int) -> list[int]:
    """The ``k`` experts of MoE layer ``layer_idx + distance - 1`` the step wants most, most wanted first.

    ``CorrelationTable.hot`` for ``distance`` 1; farther, ranked the same way
    (``CorrelationTable.rank``) by :func:`tendencies_ahead`.
    """
    scores = tendencies_ahead(table, layer_idx, prev_topk_ids, distance)
    return table.rank(layer_idx + distance - 1, scores, k)
