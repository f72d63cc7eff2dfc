"""Offline replay of a routing trace through cache policies and predictors.

Every traced layer has its own cache of ``slots`` experts (the same split for
every policy, Belady included). For each step and layer the replay

1. asks the predictor (if any) for experts and loads the missing ones
   (prefetch: at most ``slots``, assumed to arrive in time; time is not modelled),
2. serves the pass's needs in order: an expert resident now is *ready*, one
   that is not is a *miss* and is loaded on demand,
3. shows the predictor the real routing.

Counted per layer, over distinct (pass, expert) needs:

* **demand hit**: ready, and not brought in by this step's prefetch: the cache
  kept it. Without a predictor this is the hit rate whose ceiling is Belady.
* **ready**: resident when the layer ran, by cache or this step's prefetch
  (Fate's "hit rate").
* **loads**: misses plus prefetch loads; ``bytes_moved = loads * expert_bytes``.
  No cache, prefetching or not, loads fewer experts than Belady.
* **precision / recall** of predictions: predicted experts that the step needed,
  over those predicted / over the step's distinct needs.

``order`` sets what a pass may evict while it is served:

* ``sequential`` (default): experts are served one at a time in gate order and
  an expert the pass needs but has not used yet may be evicted (it then misses
  in turn), as an expert-by-expert batch-1 loop does; already served experts
  stay. This is how ``shared/traces/README.md``'s LRU column was computed.
* ``step``: the pass's experts are all pinned (one fused kernel over all slots).

Belady (evict the non-pinned expert needed farthest in the future) gives the
same count under both orders and bounds both; caches start empty (the
policies' ``warm_set`` is not loaded, so no policy starts ahead of Belady).

``nextuse`` (``core/predictive.py``) is also told, as the engine can tell it,
each step's input token ids and each pass's full needs before it is served (so
under ``sequential`` it spares the needs not served yet, which the other
policies may evict), and its learned history passes from one cache of a layer
to the next (the next sequence's), as the engine's policy keeps it across requests.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from vllm_moe_offload.core.belady import BeladyPolicy, ClairvoyantPolicy
from vllm_moe_offload.core.cache import ReplacementPolicy, SlotMap
from vllm_moe_offload.core.correlation import CorrelationTable
from vllm_moe_offload.core.policies_extra import SIM_POLICY_NAMES, make_sim_policy
from vllm_moe_offload.core.predictive import NextUsePolicy, link_layers
from vllm_moe_offload.core.predictors import PREDICTOR_NAMES, Predictor, make_predictor
from vllm_moe_offload.core.prefetch_eval import rebatch_trace, split_trace
from vllm_moe_offload.core.schedule import MODES, SlotBudget, StepPlan, build_schedules
from vllm_moe_offload.core.traces import Trace

ORDERS = ("sequential", "step")

#: what the report's rates mean, carried into every JSON report
DEFINITIONS = {
    "needed": "distinct experts each pass of each layer needed, summed",
    "demand_hit_rate": "needed experts the cache held without this step's prefetch, over needed",
    "ready_rate": "needed experts resident when the layer ran (cache or prefetch), over needed",
    "misses": "needed experts loaded on demand",
    "loads": "misses plus prefetch loads; bytes_moved = loads * expert_bytes",
    "precision": "predicted experts the step needed, over predicted",
    "recall": "predicted experts the step needed, over the step's distinct needs",
    "belady": "optimal demand cache with the same slots: ceiling of demand_hit_rate, floor of loads",
}

#: makes the policy of one layer's cache from (layer, that cache's future passes)
PolicyFactory = Callable[[int, list[list[int]]], ReplacementPolicy]


@dataclass
class LayerCounts:
    """What one layer's cache did over a replay (all counts in experts)."""

    layer_idx: int
    slots: int
    steps: int = 0
    passes: int = 0
    needed: int = 0
    cache_hits: int = 0
    prefetch_hits: int = 0
    misses: int = 0
    prefetch_loads: int = 0
    max_resident: int = 0
    predicted: int = 0
    predicted_needed: int = 0
    step_needed: int = 0

    @property
    def loads(self) -> int:
        return self.misses + self.prefetch_loads

    @property
    def demand_hit_rate(self) -> float:
        return self.cache_hits / self.needed if self.needed else 1.0

    @property
    def ready_rate(self) -> float:
        return (self.cache_hits + self.prefetch_hits) / self.needed if self.needed else 1.0

    @property
    def precision(self) -> float | None:
        return self.predicted_needed / self.predicted if self.predicted else None

    @property
    def recall(self) -> float | None:
        return self.predicted_needed / self.step_needed if self.step_needed else None

    def to_dict(self) -> dict:
        out = asdict(self)
        for key in ("loads", "demand_hit_rate", "ready_rate", "precision", "recall"):
            out[key] = getattr(self, key)
        return out


class _LayerCache:
    """One layer's slot map plus its counters, serving one step at a time."""

    def __init__(self, slot_map: SlotMap, counts: LayerCounts, order: str, spare_useful: bool = False) -> None:
        self.slots = slot_map
        self.counts = counts
        self.order = order
        self.spare_useful = spare_useful
        self._pass = 0

    def run_step(self, passes: list[list[int]], predicted: list[int] | None, tokens: Sequence[int] = ()) -> None:
        """Serve one step; ``predicted`` is None without a predictor; ``tokens``: its rows' input token ids."""
        if isinstance(self.slots.policy, NextUsePolicy):
            self.slots.policy.begin_step_tokens(tokens)
        fetched = self._prefetch(predicted or [])
        step_needed: set[int] = set()
        for needed in passes:
            self._run_pass(needed, fetched)
            step_needed.update(needed)
        self.slots.end_step()
        c = self.counts
        c.steps += 1
        if predicted is not None:
            c.predicted += len(predicted)
            c.predicted_needed += len(step_needed.intersection(predicted))
            c.step_needed += len(step_needed)

    def _prefetch(self, predicted: list[int]) -> set[int]:
        """Load the predicted experts that are missing (at most ``num_slots`` of them).

        ``spare_useful`` (as the live Fate prefetch): a load takes only a free slot
        or one whose expert the policy deems not useful; at the first expert with no
        such slot the rest of the prediction is skipped.
        """
        fetched: set[int] = set()
        for expert in predicted:
            if self.slots.slot_of(expert) is None:
                try:
                    self.slots.admit(expert, pinned=fetched, spare_useful=self.spare_useful)
                except RuntimeError:
                    break
                fetched.add(expert)
                # A prefetch counts as an access (the policy must not evict it before the
                # pass) but not as a use (it is not useful until a pass needs it).
                self.slots.touch(expert, hit=False, demand=False)
                self.counts.prefetch_loads += 1
        return fetched

    def _run_pass(self, needed: list[int], fetched: set[int]) -> None:
        c = self.counts
        policy = self.slots.policy
        if isinstance(policy, ClairvoyantPolicy):
            policy.begin_pass(self._pass)
        elif isinstance(policy, NextUsePolicy):
            policy.begin_pass_needs(needed)
        self._pass += 1
        pinned = set(needed) if self.order == "step" else set()
        for expert in needed:
            ready = self.slots.slot_of(expert) is not None
            if not ready:
                evicted = self.slots.admit(expert, pinned).evicted
                fetched.discard(evicted)
                c.misses += 1
            elif expert in fetched:
                c.prefetch_hits += 1
            else:
                c.cache_hits += 1
            pinned.add(expert)
            self.slots.touch(expert, hit=ready)
        c.max_resident = max(c.max_resident, len(self.slots))
        c.passes += 1
        c.needed += len(needed)


def replay(
    trace: Trace,
    schedules: Sequence[Sequence[StepPlan]],
    slots: Sequence[int],
    make_layer_policy: PolicyFactory,
    predictor: Predictor | None = None,
    order: str = "sequential",
    on_step: Callable[[], None] | None = None,
    spare_useful: bool = False,
) -> list[LayerCounts]:
    """Replay ``schedules`` (each with fresh, empty caches); counts summed per layer.

    The predictor is reset once and lives across schedules (its history grows).
    ``spare_useful``: prefetches never evict experts the policy deems useful (live Fate's rule).
    """
    if order not in ORDERS:
        raise ValueError(f"unknown order {order!r}; allowed: {list(ORDERS)}")
    counts = [LayerCounts(layer_idx, n) for layer_idx, n in zip(trace.meta.layer_ids, slots)]
    if predictor is not None:
        predictor.reset(trace)
    step_no = 0
    previous: list[ReplacementPolicy | None] = [None] * len(slots)
    for schedule in schedules:
        caches = [
            _LayerCache(
                SlotMap(trace.meta.num_experts, n, make_layer_policy(layer, _accesses(schedule, layer))),
                counts[layer],
                order,
                spare_useful,
            )
            for layer, n in enumerate(slots)
        ]
        for layer, cache in enumerate(caches):
            policy = cache.slots.policy
            if isinstance(policy, NextUsePolicy) and isinstance(previous[layer], NextUsePolicy):
                policy.inherit(previous[layer])
            previous[layer] = policy
        nextuse = [cache.slots.policy for cache in caches if isinstance(cache.slots.policy, NextUsePolicy)]
        if nextuse and len(nextuse) == len(caches) and nextuse[0].paths is None:
            link_layers(nextuse, trace.meta.num_experts)  # as the engine's layers share one step's routing
        for step in schedule:
            _replay_step(trace, step, step_no, caches, predictor)
            step_no += 1
            if on_step is not None:
                on_step()
    return counts


def _accesses(schedule: Sequence[StepPlan], layer: int) -> list[list[int]]:
    return [needed for step in schedule for needed in step.passes[layer]]


def _replay_step(
    trace: Trace, step: StepPlan, step_no: int, caches: list[_LayerCache], predictor: Predictor | None
) -> None:
    tokens = trace.token_ids[step.rows].tolist()
    if predictor is None:
        for layer, cache in enumerate(caches):
            cache.run_step(step.passes[layer], None, tokens)
        return
    predictor.begin_step(step_no, step.rows)
    num_experts = trace.meta.num_experts
    for layer, cache in enumerate(caches):
        limit = min(predictor.top_n, cache.slots.num_slots)
        predicted = list(dict.fromkeys(predictor.predict(step_no, layer)))[:limit]
        if any(not 0 <= e < num_experts for e in predicted):
            raise ValueError(f"{predictor.name} predicted experts outside [0, {num_experts}): {predicted}")
        cache.run_step(step.passes[layer], predicted, tokens)
        predictor.observe(step_no, layer, trace.topk_ids[step.rows, layer])
    for seq in step.ended:
        predictor.end_sequence(seq)


@dataclass(frozen=True)
class PolicySpec:
    """A cache policy, optionally with a predictor that prefetches: ``lru``, ``lfu+eap``.

    ``eap`` alone means ``lru+eap`` (MoE-Infinity's baseline: LRU cache, activation-path prefetch).
    """

    cache: str
    predictor: str | None = None

    @classmethod
    def parse(cls, text: str) -> PolicySpec:
        name = text.strip().lower()
        if name in PREDICTOR_NAMES:
            name = f"lru+{name}"
        cache, _, predictor = name.partition("+")
        if cache not in SIM_POLICY_NAMES:
            raise ValueError(f"unknown cache policy {cache!r} in {text!r}; allowed: {list(SIM_POLICY_NAMES)}")
        if predictor and predictor not in PREDICTOR_NAMES:
            raise ValueError(f"unknown predictor {predictor!r} in {text!r}; allowed: {list(PREDICTOR_NAMES)}")
        if predictor and cache == BeladyPolicy.name:
            raise ValueError("belady is the optimum of demand caching; it takes no predictor")
        return cls(cache, predictor or None)

    @property
    def name(self) -> str:
        return f"{self.cache}+{self.predictor}" if self.predictor else self.cache


#: what ``all`` stands for: every cache policy, then LRU with every predictor
ALL_POLICIES = (*SIM_POLICY_NAMES, *(f"lru+{p}" for p in PREDICTOR_NAMES))


def resolve_policies(names: Sequence[str | PolicySpec]) -> list[PolicySpec]:
    """Parsed specs without duplicates; ``all`` expands to :data:`ALL_POLICIES`; Belady is appended when missing."""
    expanded: list[str | PolicySpec] = []
    for name in names:
        is_all = isinstance(name, str) and name.strip().lower() == "all"
        expanded.extend(ALL_POLICIES if is_all else [name])
    specs = [n if isinstance(n, PolicySpec) else PolicySpec.parse(n) for n in expanded]
    specs = list(dict.fromkeys(specs))
    if PolicySpec(BeladyPolicy.name) not in specs:
        specs.append(PolicySpec(BeladyPolicy.name))
    return specs


def simulate(
    trace: Trace,
    budgets: Sequence[SlotBudget | int],
    policies: Sequence[str | PolicySpec],
    *,
    mode: str = "per-sequence",
    order: str = "sequential",
    prefetch_n: int | None = None,
    expert_bytes: int | None = None,
    on_step: Callable[[], None] | None = None,
    batch: int | None = None,
    warmup: float = 0.0,
    profile: CorrelationTable | None = None,
    spare_useful: bool = False,
) -> dict:
    """Replay ``trace`` for every budget and policy; a JSON-ready report.

    ``prefetch_n`` (experts per layer and step a predictor may prefetch)
    defaults to ``top_k``; ``expert_bytes`` to the trace's, else 1 (an "expert
    unit"). ``batch``: first regroup the trace into steps of that many tokens
    (``prefetch_eval.rebatch_trace``; use with ``mode="shared"``). ``warmup``:
    the share of the rows (first steps) that predictors learn from before the
    replay, which then covers only the rest (no leakage). ``profile``: the
    starting table of the ``corr`` predictor. ``spare_useful``: prefetches
    never evict experts the policy deems useful (``SlotMap.useful``, the live
    Fate prefetch's rule). Raises ``ValueError`` for a
    budget below ``top_k`` slots (a token could not run) and for unknown
    policies or modes.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; allowed: {list(MODES)}")
    if batch is not None:
        trace = rebatch_trace(trace, batch)
    warm, trace = split_trace(trace, warmup)
    meta = trace.meta
    specs = resolve_policies(policies)
    prefetch_n = meta.top_k if prefetch_n is None else prefetch_n
    if prefetch_n < 1:
        raise ValueError(f"prefetch_n must be at least 1 expert, got {prefetch_n}")
    unit_bytes = expert_bytes or meta.expert_bytes or 1
    results = []
    for budget in budgets:
        budget = budget if isinstance(budget, SlotBudget) else SlotBudget(slots=int(budget))
        slots = budget.resolve(meta.num_experts)
        if slots < meta.top_k:
            raise ValueError(f"budget {budget} gives {slots} slots per layer, fewer than top_k={meta.top_k}")
        schedules = build_schedules(trace, mode, [slots] * trace.num_trace_layers)
        entry = {"budget": str(budget), "slots_per_layer": slots, "fraction_of_experts": slots / meta.num_experts}
        entry["policies"] = {
            spec.name: summarize(
                _run_spec(trace, schedules, slots, spec, prefetch_n, order, on_step, warm, profile, spare_useful),
                unit_bytes,
                trace.num_tokens,
            )
            for spec in specs
        }
        results.append(entry)
    return {
        "trace": _trace_summary(trace),
        "mode": mode,
        "order": order,
        "prefetch_n": prefetch_n,
        "batch": batch,
        "warmup_fraction": warmup,
        "warmup_tokens": 0 if warm is None else warm.num_tokens,
        "profile": profile is not None,
        "spare_useful": spare_useful,
        "expert_bytes": unit_bytes,
        "expert_bytes_known": bool(expert_bytes or meta.expert_bytes),
        "policies": [spec.name for spec in specs],
        "definitions": DEFINITIONS,
        "results": results,
    }


def _run_spec(
    trace: Trace,
    schedules: list[list[StepPlan]],
    slots: int,
    spec: PolicySpec,
    prefetch_n: int,
    order: str,
    on_step: Callable[[], None] | None,
    warm: Trace | None = None,
    profile: CorrelationTable | None = None,
    spare_useful: bool = False,
) -> list[LayerCounts]:
    meta = trace.meta

    def make_layer_policy(layer: int, accesses: list[list[int]]) -> ReplacementPolicy:
        return make_sim_policy(spec.cache, meta.num_experts, slots, meta.top_k, accesses)

    predictor = make_predictor(spec.predictor, prefetch_n, warm, profile) if spec.predictor else None
    layer_slots = [slots] * trace.num_trace_layers
    return replay(trace, schedules, layer_slots, make_layer_policy, predictor, order, on_step, spare_useful)


_SUMMED = ("passes", "needed", "cache_hits", "prefetch_hits", "misses", "prefetch_loads",
           "max_resident", "predicted", "predicted_needed", "step_needed")
_PER_LAYER = ("layer_idx", "slots", "max_resident", "demand_hit_rate", "ready_rate", "misses", "loads",
              "precision", "recall")


def summarize(layers: Sequence[LayerCounts], expert_bytes: int, num_tokens: int) -> dict:
    """Totals over layers plus a short per-layer list; rates as shares in [0, 1].

    ``steps`` is per layer (the same for all); every other count is summed over
    layers (``slots`` and ``max_resident`` too: all layers' slots, peaks added).
    """
    total = LayerCounts(layer_idx=-1, slots=sum(c.slots for c in layers), steps=layers[0].steps if layers else 0)
    for key in _SUMMED:
        setattr(total, key, sum(getattr(c, key) for c in layers))
    out = total.to_dict()
    del out["layer_idx"]
    out["bytes_moved"] = total.loads * expert_bytes
    out["bytes_per_token"] = out["bytes_moved"] / num_tokens if num_tokens else 0.0
    out["per_layer"] = []
    for c in layers:
        layer = c.to_dict()
        out["per_layer"].append({key: layer[key] for key in _PER_LAYER})
    return out


def _trace_summary(trace: Trace) -> dict:
    meta = trace.meta
    return {
        "name": trace.name(),
        "path": trace.path,
        "model": meta.model,
        "num_layers": meta.num_layers,
        "layer_ids": list(meta.layer_ids),
        "num_experts": meta.num_experts,
        "top_k": meta.top_k,
        "num_tokens": trace.num_tokens,
        "num_sequences": len(trace.sequences()),
        "num_steps": int(len(np.unique(trace.step_ids))),
    }
