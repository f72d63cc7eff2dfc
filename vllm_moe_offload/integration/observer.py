"""The routing observer: every MoE layer's routing feeds Klotski's prefetcher, the eap baseline, profiles.

Each offloaded layer hands its ``topk_ids`` to the :class:`RoutingObserver`
before it computes. The observer counts them in the correlation table (pairs
with the previous MoE layer's choice of the same tokens; saved as a profile
with ``--moe-offload-save-profile``) and prefetches the next layer's experts:

* ``klotski``: the *hot* experts, the ``K`` experts the step's tokens want
  most, summed over all tokens. ``K`` comes from the planner
  (``core/klotski_plan.py``), re-run at the first MoE layer of every step from
  what this host measured: the time between two MoE layers (attention, norms,
  router), the kernel time, one expert's load time and the live number of
  tokens. The plan is logged when it changes and is part of the statistics.
* ``eap``: each request's activation path matched against finished requests
  (``core/activation_paths.py``, MoE-Infinity style), ``top_k`` experts per
  request of the step; the baseline Fate and Klotski are compared with.

Those loads run while this layer's experts and the next layer's attention
compute. With a profile (``--moe-offload-profile``) the table starts from it.

Klotski's switches (``klotski_features``, for the paper's ablation): without
``hot`` the observer prefetches the whole next layer, as many of its experts as
fit, most used first (the ablation's first row, "simple overlap"). Each plan's
verdict (overlapped or not) goes to the grouping scheduler
(``integration/scheduler.py``, feature ``groups``), which widens steps while
loads dominate.

Not here (see the closing notes of issue 5): prefetching deeper than one layer.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from vllm_moe_offload.core.activation_paths import ActivationPaths
from vllm_moe_offload.core.correlation import CorrelationTable, load_profile
from vllm_moe_offload.core.klotski_plan import KlotskiCosts, KlotskiLimits, KlotskiPlan, plan_klotski
from vllm_moe_offload.core.config import KLOTSKI_FEATURES
from vllm_moe_offload.integration import faults, scheduler

logger = logging.getLogger("vllm.moe_offload.observer")

#: weight of the newest sample in the smoothed timings (same as the layers' own)
_EMA = 0.1


class RoutingObserver:
    """Counts the routing of every step and prefetches the next layer's experts.

    ``predict``: ``"klotski"`` (the correlation table's hot experts, K from the
    planner), ``"eap"`` (activation paths per request, the MoE-Infinity-style
    baseline) or None (count only, for profiles).
    """

    def __init__(
        self, table: CorrelationTable, layers: list, predict: str | None, kv_max_seqs: int,
        features: tuple[str, ...] = KLOTSKI_FEATURES,
    ) -> None:
        self.table = table
        self.features = features
        scheduler.reset()  # this engine's scheduler (built after the workers) starts from nothing
        self.layers = layers  # OffloadRoutedExperts in MoE order; ordinal i is table layer i
        self.predict = predict
        self.paths = (
            ActivationPaths(len(layers), layers[0].global_num_experts) if predict == "eap" else None
        )
        self._step_requests: list[str | None] | None = None
        self.kv_max_seqs = kv_max_seqs
        self._ordinal = {layer.layer_name: i for i, layer in enumerate(layers)}
        self._prev: tuple[int, np.ndarray] | None = None  # (ordinal, topk_ids [T, k]) of the last layer seen
        self._last_end_s: float | None = None
        self.between_ms_ema: float | None = None  # attention etc. between two MoE layers
        self.plan: KlotskiPlan | None = None
        self.plan_changes = 0

    def on_route(self, layer, topk_ids: torch.Tensor) -> None:
        """Layer ``layer`` routed its tokens to ``topk_ids [T, k]`` and is about to compute."""
        now = time.perf_counter()
        i = self._ordinal[layer.layer_name]
        ids = topk_ids.cpu().numpy()  # [T, k]
        prev = None
        if self._prev is not None and self._prev[0] == i - 1 and self._prev[1].shape[0] == ids.shape[0]:
            prev = self._prev[1]
            if self._last_end_s is not None:
                self._smooth_between((now - self._last_end_s) * 1e3)
        self.table.update(i, prev, ids)
        self._prev = (i, ids)
        if self.paths is not None:
            self._observe_paths(i, ids)
        if not self.predict or i + 1 >= len(self.layers):
            return
        nxt = self.layers[i + 1]
        if nxt.slots is None or nxt.slots.fully_resident:
            return
        if self.predict == "eap":
            requests = {r for r in self._step_requests or () if r is not None}
            k = min(nxt.slots.num_slots, nxt.top_k * max(1, len(requests)))
            nxt.slots.prefetch(self.paths.predict(requests, i + 1, k))
            return
        if i == 0 or self.plan is None:
            self._replan(ids.shape[0])
        assert self.plan is not None
        if "hot" in self.features:  # never evicting what the cache deems useful, as fate
            nxt.slots.prefetch(self.table.hot(i + 1, ids, self.plan.hot_experts), spare_useful=True)
        else:  # simple overlap: the whole next layer, as much of it as fits, most used first
            nxt.slots.prefetch(self.table.hot(i + 1, None, nxt.slots.num_slots) or range(nxt.slots.num_slots))

    def _observe_paths(self, i: int, ids: np.ndarray) -> None:
        """eap: add the step's routing at MoE layer ``i`` to each request's activation matrix."""
        assert self.paths is not None
        if i == 0:
            self._step_requests = faults.request_of_each_row(ids.shape[0])
            live = faults.live_requests()
            if live is not None:
                self.paths.finish(self.paths.live() - live)  # ended since the last step
        if self._step_requests is not None and len(self._step_requests) == ids.shape[0]:
            self.paths.observe(self._step_requests, i, ids)

    def on_computed(self) -> None:
        """The layer that routed last finished its experts."""
        self._last_end_s = time.perf_counter()

    def _smooth_between(self, ms: float) -> None:
        self.between_ms_ema = ms if self.between_ms_ema is None else (1 - _EMA) * self.between_ms_ema + _EMA * ms

    def _replan(self, num_tokens: int) -> None:
        """Run the planner for a step of ``num_tokens`` tokens on what was measured so far."""
        layer = self.layers[-1]
        slots = layer.slots
        compute_ms = (layer.compute_s_ema or 0.0) * 1e3
        costs = KlotskiCosts(
            attn_ms_per_token=0.0,
            attn_ms_fixed=self.between_ms_ema or 0.0,
            expert_ms_per_token=compute_ms / max(1, num_tokens * layer.top_k),
            expert_load_ms=(slots.load_s_ema or 0.0) * 1e3 if slots is not None else 0.0,
        )
        limits = KlotskiLimits(
            num_experts=self.table.num_experts, top_k=self.table.top_k,
            slots=max(self.table.top_k, min(s.slots.num_slots for s in self.layers[1:] if s.slots is not None)),
            kv_max_seqs=max(1, self.kv_max_seqs), max_depth=1,
            reserve_slots=0,
        )
        plan = plan_klotski(costs, limits, num_tokens)
        old = self.plan
        self.plan = plan
        # a plan from unmeasured costs (the first steps, before any load or kernel was timed) says nothing
        scheduler.note_plan(plan.overlapped if costs.expert_load_ms > 0 and compute_ms > 0 else None)
        if old is None or (old.group_size, old.hot_experts, old.prefetch_depth) != (
            plan.group_size, plan.hot_experts, plan.prefetch_depth
        ):
            self.plan_changes += 1
            level = logging.INFO if self.plan_changes <= 20 else logging.DEBUG  # not a line per step forever
            logger.log(level, "%s", plan.describe())

    def stats(self) -> dict:
        plan = self.plan
        return {
            "plan": None if plan is None else {
                "group_size": plan.group_size, "hot_experts": plan.hot_experts,
                "prefetch_depth": plan.prefetch_depth, "batch_size": plan.batch_size,
                "overlapped": plan.overlapped, "bubble_ms": plan.bubble_ms, "limiter": plan.limiter,
                "describe": plan.describe(),
            },
            "plan_changes": self.plan_changes,
            "features": list(self.features),
            **scheduler.counts(),
            "between_layers_ms": self.between_ms_ema,
            "tokens_seen": int(self.table.tokens_seen),
            **({"eap_history": len(self.paths)} if self.paths is not None else {}),
        }


def make_table(layers: list, profile: str | None, model: str) -> CorrelationTable:
    """A fresh table for ``layers``, or the one saved in ``profile`` (checked against the model)."""
    first = layers[0]
    geometry = (len(layers), first.global_num_experts, first.top_k)
    if profile is None:
        return CorrelationTable(*geometry, model=model, layer_ids=[layer.layer_idx for layer in layers])
    table = load_profile(profile, geometry)  # ProfileError names the mismatch
    if table.model and table.model != model:
        logger.warning(
            "MoE offload: activation profile %s was recorded on %s, not %s (same geometry): its statistics may "
            "not fit this model", profile, table.model, model,
        )
    logger.info("MoE offload: activation profile %s (%d tokens seen) loaded", profile, int(table.tokens_seen))
    return table


def profile_warm_set(table: CorrelationTable, ordinal: int, num_slots: int) -> list[int]:
    """The ``num_slots`` experts of a layer the profile saw most, most used first (empty when unseen)."""
    return table.hot(ordinal, None, num_slots)
