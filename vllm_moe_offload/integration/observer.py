"""The routing observer: every MoE layer's routing feeds Klotski's prefetcher, the eap baseline, profiles.

Each offloaded layer hands its ``topk_ids`` to the :class:`RoutingObserver`
before it computes. The observer counts them in the correlation table (pairs
with the previous MoE layer's choice of the same tokens; saved as a profile
with ``--moe-offload-save-profile``) and prefetches the next layer's experts:

* ``klotski``: the *hot* experts, the ``K`` experts the step's tokens want
  most, summed over all tokens, for each of the next ``depth`` layers (farther
  layers: the tendencies chained over the layers in between,
  ``core/klotski_plan.hot_ahead``). ``K`` and ``depth`` come from the planner
  (``core/klotski_plan.py``), re-run at the first MoE layer of a step whose
  size differs from the plan's, or every ``REPLAN_EVERY_STEPS`` steps, from
  what this host measured: lines in the step's tokens fitted over past steps
  (warm-up steps left out) of the time between two MoE layers (attention,
  norms, router) and of a MoE layer's own time without its waits for loads;
  one expert's load time; the live number of tokens; and the slots a prefetch
  may fill without evicting useful experts. The depth is capped by the I/O
  lanes (with one, loads already queue back to back; looking farther only
  adds wrong guesses, as Fate found) and by the layers left. The plan is
  logged when it changes and is part of the statistics.
* ``eap``: each request's activation path matched against finished requests
  (``core/activation_paths.py``, MoE-Infinity style), ``top_k`` experts per
  request of the step; the baseline Fate and Klotski are compared with.

Those loads run while this layer's experts and the next layer's attention
compute. With a profile (``--moe-offload-profile``) the table starts from it.

Klotski's switches (``klotski_features``, for the paper's ablation): without
``hot`` the observer prefetches the whole next layer, as many of its experts as
fit, most used first (the ablation's first row, "simple overlap"). Each plan's
verdict (overlapped or not) goes to the grouping scheduler
(``integration/scheduler.py``, feature ``groups``), with the loads one step
needs: it widens steps while loads dominate, and holds decode steps briefly
for arriving requests.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import numpy as np
import torch

from vllm_moe_offload.core.activation_paths import ActivationPaths
from vllm_moe_offload.core.correlation import CorrelationTable, load_profile
from vllm_moe_offload.core.klotski_plan import (
    KlotskiLimits,
    KlotskiPlan,
    StepCostFit,
    measured_costs,
    plan_klotski,
    tendencies_ahead,
)
from vllm_moe_offload.core.config import KLOTSKI_FEATURES
from vllm_moe_offload.core.prefetch_gate import step_kind
from vllm_moe_offload.integration import faults, scheduler
from vllm_moe_offload.integration.experts import MAX_LOOKAHEAD

logger = logging.getLogger("vllm.moe_offload.observer")

#: steps of one size a plan made on measured costs stands for: the fits it reads move slowly, and planning
#: (the step's plan and the grouped one) at every step's first layer cost batch-1 decode about 0.3 ms a step
REPLAN_EVERY_STEPS = 8


class RoutingObserver:
    """Counts the routing of every step and prefetches the next layer's experts.

    ``predict``: ``"klotski"`` (the correlation table's hot experts, K from the
    planner), ``"eap"`` (activation paths per request, the MoE-Infinity-style
    baseline) or None (count only, for profiles).
    """

    def __init__(
        self, table: CorrelationTable, layers: list, predict: str | None, kv_max_seqs: int,
        features: tuple[str, ...] = KLOTSKI_FEATURES, max_group: int = 1, io_lanes: int = 1,
        gate_prefetches: bool = False,
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
        # per-layer times of the step under way: between two MoE layers (attention, norms, router),
        # and a MoE layer's own (its kernels and bookkeeping, its waits for loads taken out)
        self._step_tokens = 0
        self._step_between_ms: list[float] = []
        self._step_moe_ms: list[float] = []
        self._moe_started: tuple[float, float] | None = None  # (perf_counter, the layer's stall_s) at start
        self.between_fit = StepCostFit()
        self.moe_fit = StepCostFit()
        # as far as Fate's look-ahead goes (chained predictions get worse with every layer, and their
        # loads queue ahead of nearer ones), at most the I/O threads, within the model
        self.max_depth = max(1, min(MAX_LOOKAHEAD, io_lanes, len(layers) - 1))
        self.max_group = max_group
        #: klotski's hot-expert prefetches, like fate's, load only where this layer's earlier ones of that
        #: kind (one token's step, a batch's) were right often enough to pay (``core/prefetch_gate.py``)
        self.gate_prefetches = gate_prefetches
        self.plan: KlotskiPlan | None = None  # this step's: K and depth of its prefetches
        self.group_plan: KlotskiPlan | None = None  # Klotski's choice of n for steps of this size
        self.plan_changes = 0
        self.depth_steps: dict[int, int] = {}  # steps planned at each prefetch depth
        self._planned_at: tuple[int, int] | None = None  # (steps seen, tokens) when the plan was made
        self._steps = 0  # steps seen (their first MoE layer routed)
        self.replans = 0

    def on_route(self, layer, topk_ids: torch.Tensor) -> None:
        """Layer ``layer`` routed its tokens to ``topk_ids [T, k]`` and is about to compute."""
        now = time.perf_counter()
        i = self._ordinal[layer.layer_name]
        ids = topk_ids.cpu().numpy()  # [T, k]
        if i == 0:
            self._end_step()
            self._step_tokens = ids.shape[0]
        prev = None
        if self._prev is not None and self._prev[0] == i - 1 and self._prev[1].shape[0] == ids.shape[0]:
            prev = self._prev[1]
            if self._last_end_s is not None:
                self._step_between_ms.append((now - self._last_end_s) * 1e3)
        self.table.update(i, prev, ids)
        self._prev = (i, ids)
        try:
            self._predict(i, ids)
        finally:  # the layer's own time starts after the observer's work
            self._moe_started = (time.perf_counter(), layer.slots.stats.stall_s if layer.slots is not None else 0.0)

    def _predict(self, i: int, ids: np.ndarray) -> None:
        """Prefetch for the layers after MoE layer ``i``, whose tokens chose ``ids [T, k]``."""
        if self.paths is not None:
            self._observe_paths(i, ids)
        if not self.predict or i + 1 >= len(self.layers):
            return
        nxt = self.layers[i + 1]
        if self.predict == "eap":
            if nxt.slots is None or nxt.slots.fully_resident:
                return
            requests = {r for r in self._step_requests or () if r is not None}
            k = min(nxt.slots.num_slots, nxt.top_k * max(1, len(requests)))
            nxt.slots.prefetch(self.paths.predict(requests, i + 1, k))
            return
        if i == 0:
            self._steps += 1
        if self.plan is None or (i == 0 and self._plan_is_stale(ids.shape[0])):
            self._replan(ids.shape[0])
        assert self.plan is not None
        if i == 0:
            self.depth_steps[self.plan.prefetch_depth] = self.depth_steps.get(self.plan.prefetch_depth, 0) + 1
        if "hot" not in self.features:  # simple overlap: the whole next layer, as much as fits, most used first
            if nxt.slots is not None and not nxt.slots.fully_resident:
                nxt.slots.prefetch(self.table.hot(i + 1, None, nxt.slots.num_slots) or range(nxt.slots.num_slots))
            return
        # nearest first: its loads are needed first; a nearer prediction of a layer, made again at the
        # next layer, wins over the farther one (LayerSlots.prefetch)
        kind = step_kind(ids.shape[0]) if self.gate_prefetches else None
        # a batch's layer computes while its own missing experts load; these predictions' loads queue behind
        own = self.layers[i].slots
        backlog_s = own.missing_load_s(np.unique(ids).tolist()) if kind == "batch" and own is not None else 0.0
        for distance in range(1, min(self.plan.prefetch_depth, len(self.layers) - 1 - i) + 1):
            target = self.layers[i + distance].slots
            if target is None or target.fully_resident:
                continue
            if not target.prediction_wanted(distance, kind, backlog_s):
                continue  # it would not be loaded: skip making it, but for the samples that keep it measured
            scores = tendencies_ahead(self.table, i + 1, ids, distance)  # [E], ranked as hot_ahead does
            experts = self.table.rank(i + distance, scores, self.plan.hot_experts)
            # never evicting what the cache deems useful, as fate (nor, on a scheduled link, what scores higher)
            target.prefetch(experts, spare_useful=True, distance=distance, scores=scores.tolist(), gate=kind,
                            backlog_s=backlog_s)

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
        self._last_end_s = now = time.perf_counter()
        if self._moe_started is None or self._prev is None:
            return
        started_s, stall_s = self._moe_started
        slots = self.layers[self._prev[0]].slots
        waited_s = (slots.stats.stall_s - stall_s) if slots is not None else 0.0
        self._step_moe_ms.append(max(0.0, now - started_s - waited_s) * 1e3)
        self._moe_started = None

    def _end_step(self) -> None:
        """A new step starts: the last one's mean per-layer times join the fits."""
        if self._step_tokens and self._step_moe_ms:
            self.moe_fit.add(self._step_tokens, sum(self._step_moe_ms) / len(self._step_moe_ms))
        if self._step_tokens and self._step_between_ms:
            self.between_fit.add(self._step_tokens, sum(self._step_between_ms) / len(self._step_between_ms))
        self._step_moe_ms.clear()
        self._step_between_ms.clear()

    def _plan_is_stale(self, num_tokens: int) -> bool:
        """Whether a step of ``num_tokens`` tokens needs a new plan: one made before the costs were measured,
        for a step of another size, or ``REPLAN_EVERY_STEPS`` steps ago."""
        if self._planned_at is None:
            return True
        steps, tokens = self._planned_at
        return tokens != num_tokens or self._steps - steps >= REPLAN_EVERY_STEPS

    def _replan(self, num_tokens: int) -> None:
        """Run the planner for a step of ``num_tokens`` tokens on what was measured so far.

        Two answers: the plan of this step as vLLM scheduled it (``n`` = 1: its
        ``K`` and depth drive this step's prefetches, its verdict tells the
        grouping scheduler whether loads hide at this size), and Klotski's choice
        of ``n`` up to ``max_group`` (what grouping the scheduler's wider steps
        aim at; statistics and log).
        """
        offloaded = [layer.slots for layer in self.layers[1:] if layer.slots is not None]
        loads_ms = [s.load_s_ema * 1e3 for s in offloaded if s.load_s_ema]
        costs = measured_costs(
            self.between_fit, self.moe_fit, self.table.top_k, sum(loads_ms) / len(loads_ms) if loads_ms else 0.0,
        )
        limits = KlotskiLimits(
            num_experts=self.table.num_experts, top_k=self.table.top_k,
            slots=max(self.table.top_k, min((s.num_slots for s in offloaded), default=self.table.top_k)),
            kv_max_seqs=max(1, self.kv_max_seqs), max_group=1, max_depth=self.max_depth,
            reserve_slots=0, spare_slots=_spare_slots(offloaded),
        )
        self.replans += 1
        plan = plan_klotski(costs, limits, num_tokens)
        group = plan_klotski(costs, replace(limits, max_group=self.max_group), num_tokens)
        old, old_group = self.plan, self.group_plan
        self.plan, self.group_plan = plan, group
        # a plan from unmeasured costs (the first steps, before any load or kernel was timed) says nothing
        measured = costs.expert_load_ms > 0 and self.moe_fit.ready
        self._planned_at = (self._steps, num_tokens) if measured else None
        offloaded_layers = sum(1 for s in offloaded if not s.fully_resident)
        scheduler.note_plan(plan.overlapped if measured else None, plan.io_ms * offloaded_layers)
        if old is None or old_group is None or _choice(old) != _choice(plan) or _choice(old_group) != _choice(group):
            self.plan_changes += 1
            level = logging.INFO if self.plan_changes <= 20 else logging.DEBUG  # not a line per step forever
            logger.log(
                level, "%s; grouped: n=%d, %s, limited by %s", plan.describe(), group.group_size,
                "overlapped" if group.overlapped else f"bubble {group.bubble_ms:.3g} ms/layer", group.limiter,
            )

    def stats(self) -> dict:
        plan = self.plan
        return {
            "plan": None if plan is None else {
                "group_size": plan.group_size, "hot_experts": plan.hot_experts, "hot_loads": plan.hot_loads,
                "prefetch_depth": plan.prefetch_depth, "batch_size": plan.batch_size,
                "overlapped": plan.overlapped, "bubble_ms": plan.bubble_ms, "limiter": plan.limiter,
                "describe": plan.describe(),
            },
            "group_plan": None if self.group_plan is None else {
                "group_size": self.group_plan.group_size, "overlapped": self.group_plan.overlapped,
                "limiter": self.group_plan.limiter,
            },
            "plan_changes": self.plan_changes,
            "replans": self.replans,
            "max_depth": self.max_depth,
            "depth_steps": dict(sorted(self.depth_steps.items())),
            "features": list(self.features),
            **scheduler.counts(),
            "between_layers_ms": _line(self.between_fit),
            "moe_layer_ms": _line(self.moe_fit),
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


def _spare_slots(slots: list) -> int | None:
    """The fewest slots of any offloaded layer that a prefetch may fill without evicting a useful expert."""
    return min((s.slot_map.spare_slots() for s in slots if not s.fully_resident), default=None)


def _line(fit: StepCostFit) -> dict | None:
    """A fitted per-layer time for the statistics: ms = fixed_ms + per_token_ms x tokens."""
    if not fit.ready:
        return None
    fixed, per_token = fit.coefficients()
    return {"fixed_ms": fixed, "per_token_ms": per_token, "steps": fit.samples}


def _choice(plan: KlotskiPlan) -> tuple[int, int, int, int]:
    """What a plan decides (a change is logged)."""
    return plan.group_size, plan.hot_experts, plan.hot_loads, plan.prefetch_depth
