"""Next-layer fill: in a step of several tokens, the link loads the next layer's first experts while this one computes.

A layer's loads can start only once its routing is known, so with every policy the link idled at each
layer boundary: from the layer's last load until the next layer's first (its last wave's kernel, the
attention, the next layer's planning), about 3.5 ms per layer of a 512-token prefill of the padded tiny
Mixtral at 25%, a fifth of the prefill (``docs/bench/layer-ahead/``). Here each offloaded layer, at the start
of a step of at least ``min_tokens`` rows, runs the next offloaded layer's router on its own input (the
residual stream keeps the two close: Fate's observation) and queues, behind its own misses, that layer's
missing experts in the order the layer will want them, as many as the link would otherwise idle for
(:class:`LayerAhead`: the idle time between the two layers as measured, over one load's time; the link
schedule's admission rule, ``core/link.py``). It does so once the layer's own misses have their slots
(``LayerSlots.after_own_loads``): made first, the loads ahead took a shared pool's free slots and the layer's
own loads then evicted residents instead. A wrong guess costs a load and a slot; more loads ahead than the
idle time read 10-20% more without gain on the padded tiny Mixtral (fixed counts of 4 to 16 per layer). And an
expert whose predictions while missing were mostly wrong lately is skipped (:data:`MIN_EXPERT_PRECISION`): the
router errs on some experts again and again.

Independent of the replacement policy; fate's own router look-ahead (``experts.py``) keeps the steps this
leaves to it (one token, and every step where this is off).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from vllm_moe_offload.core.link import first_pass
from vllm_moe_offload.integration.passes import load_order, row_experts

logger = logging.getLogger("vllm.moe_offload.setup")

#: the ``predictor`` these predictions are scored under (``LayerSlots.prefetch``): apart from fate's routers'
PREDICTOR = "layer-ahead"

#: the fewest rows of a step that loads ahead: every step of several tokens. Batch-1 decode is left to the
#: policies' own predictors (fate's routers and next-token table)
MIN_TOKENS = 2

#: steps of up to this many rows share one measure of the link's free time between layers (a batch's decode
#: steps); larger ones keep one per power of two of their rows (a prefill's layers compute longer after their
#: loads the more rows they have: 512 rows left the link about 3.5 ms per layer, 4096 rows about 20)
_FEW_ROWS = 64

#: weight of the newest idle time between two layers
_IDLE_ALPHA = 0.3

#: a missing expert that the next layer's router predicts is loaded ahead only while the router's predictions of
#: it while missing, in steps of the same kind, were right at least this often (smoothed; untried: loaded). The
#: router on the layer before's input errs on some experts again and again, and the cache keeps what is used,
#: so the misses it predicts are its errors more often than its predictions overall: in the 32-request batch of
#: the padded tiny Mixtral at 50%, the experts it had load ahead in decode steps were right 0.21-0.83 of the
#: time by how many rows wanted them (0.38 for five rows or more), against 0.69-0.91 for all it predicted
#: (``docs/bench/pool-floor/``); each wrong one costs its load and the later load of the expert it pushed out
MIN_EXPERT_PRECISION = 0.5

#: weight of the newest outcome in an expert's precision
_PRECISION_ALPHA = 0.3

#: above this many rows the next layer's experts are ordered by the rows that want them (a torch bincount)
#: rather than by :func:`~vllm_moe_offload.integration.passes.load_order`'s greedy, which took about 3.5 ms
#: for a 4096-row step of tiny-mixtral: more than the load it orders
_GREEDY_MAX_ROWS = 64


def step_kind(rows: int) -> int:
    """Steps of the same kind share one measure of the link's free time: up to ``_FEW_ROWS`` rows, 0; else
    the bit length of ``rows`` (513 to 1024 rows: 10)."""
    return 0 if rows <= _FEW_ROWS else rows.bit_length()


class LayerAhead:
    """One offloaded layer's look at the next: ``nxt`` (an ``OffloadRoutedExperts``) and its router ``gate``.

    How many of the next layer's experts load ahead: as many as fit the link's free time between the two
    layers, measured from the end of this layer's own demand loads (its start where it had none) to the next
    layer's first demand load: the rest of this layer's compute, the compute between the two MoE ops and the
    next layer's own planning (the loads ahead run in it and do not change it). Smoothed, per kind of step
    (:func:`step_kind`: a prefill's layers compute long after their loads). At least one.
    """

    def __init__(self, layer, nxt, gate: torch.nn.Module, min_tokens: int) -> None:
        self.layer = layer
        self.nxt = nxt
        self.gate = gate  # called as gate(x) -> (logits [T, E], bias)
        self.min_tokens = min_tokens
        #: the link's free time between the two layers, smoothed, by kind of step (:func:`step_kind`)
        self.idle_s: dict[int, float] = {}
        #: the kind of this layer's last step that loaded ahead, and that step's count (``stats.steps`` then)
        self._last: tuple[int, int] | None = None
        #: by kind of step, each expert's precision when predicted missing (:data:`MIN_EXPERT_PRECISION`)
        self.precision: dict[int, dict[int, float]] = {}
        #: the last prediction to score: its kind, the next layer's step count then, the missing experts predicted
        self._guessed: tuple[int, int, list[int]] | None = None

    def prefetch(self, x: torch.Tensor) -> None:
        """This layer's step on ``x [T, H]`` starts: queue the next layer's first missing experts."""
        slots = self.nxt.slots
        if slots is None or slots.fully_resident:
            return
        self._measure_idle()
        self._score_guesses()
        kind = step_kind(x.shape[0])
        self._last = (kind, self.layer.slots.stats.steps)
        ids = self.gate(x)[0].topk(self.nxt.top_k, dim=-1).indices  # [T, k]
        wanted, order = self._order(ids, slots)
        if not order:
            return
        self._guessed = (kind, slots.stats.steps, order)
        precision = self.precision.get(kind)
        if precision:
            order = [e for e in order if precision.get(e, 1.0) >= MIN_EXPERT_PRECISION]
            if not order:
                return
        # a load ahead never evicts the next layer's experts that this step's rows will want (as predicted) or
        # that its last steps used (the cache's "useful": a guess is not worth them, and where the prediction
        # missed one, it must not be read again; a broken checkpoint would fail requests it served before)
        slot_map = slots.slot_map
        keep = set(wanted).union(e for e in slot_map.resident() if slot_map.useful(e))
        slots.prefetch(order[: self._admitted(len(order), kind)], spare_useful=True, predictor=PREDICTOR,
                       keep=keep)

    def _admitted(self, candidates: int, kind: int) -> int:
        """How many loads ahead fit the link's idle time: each starts while the loads queued before it (the
        prefetches already queued, then those admitted here) take less than the idle time, on the engine's
        I/O lanes (the link schedule's admission rule, ``core/link.py``). At least one; one until the idle
        time and a load's time are measured."""
        slots = self.nxt.slots
        idle_s, load_s = self.idle_s.get(kind), slots.load_s_ema
        if not idle_s or not load_s:
            return 1
        engine = slots.engine  # a ThreadTransferEngine (the CUDA one is one too)
        backlog = engine.prefetch_backlog_bytes() / slots.expert_bytes
        admitted = 1
        while admitted < candidates and (backlog + admitted) * load_s < idle_s * engine.num_threads:
            admitted += 1
        return admitted

    def _score_guesses(self) -> None:
        """Score the last prediction against what the next layer's step needed (where it ran that step, and
        only that one, since): each missing expert predicted, loaded ahead or not."""
        guessed, self._guessed = self._guessed, None
        if guessed is None:
            return
        kind, step, experts = guessed
        slots = self.nxt.slots
        needs = slots.last_step_needs
        if needs is None or slots.stats.steps != step + 1:
            return
        record = self.precision.setdefault(kind, {})
        for expert in experts:
            old = record.get(expert, 1.0)
            record[expert] = old + _PRECISION_ALPHA * ((expert in needs) - old)

    def _measure_idle(self) -> None:
        """Learn from the two layers' last steps how long the link was free between them (where both are known).

        Only when this layer's last step was the one that loaded ahead (whose kind is known), and the next
        layer's last step queued a demand load after it ended."""
        if self._last is None:
            return
        kind, step = self._last
        own = self.layer.slots
        ended, done, first = own.ended_s, own.own_loads_done_s, self.nxt.slots.first_demand_s
        if own.stats.steps != step + 1 or ended is None or done is None or first is None or first < ended:
            return
        gap = max(0.0, first - done)
        ema = self.idle_s.get(kind)
        self.idle_s[kind] = gap if ema is None else (1 - _IDLE_ALPHA) * ema + _IDLE_ALPHA * gap

    def _order(self, ids: torch.Tensor, slots) -> tuple[list[int], list[int]]:
        """Every expert the next layer's rows will want for routing ``ids [T, k]``, and the missing ones it will
        want first (its first pass's, where it runs in passes), not already loading, the first wanted first."""
        counts = torch.bincount(ids.reshape(-1), minlength=slots.slot_map.num_experts)  # [E]
        wanted = counts.nonzero().flatten().tolist()
        greedy = ids.shape[0] <= _GREEDY_MAX_ROWS
        passes = len(wanted) > slots.num_slots  # the layer runs in passes: its first pass's experts come first
        rows = row_experts(ids) if greedy or passes else None
        first = first_pass(rows, slots.num_slots, slots.slot_map.resident()) if passes else wanted
        missing = slots.missing(first)
        flying = set(slots.in_flight(missing))
        if greedy:
            return wanted, load_order(rows, missing, ahead=flying)
        wanting = counts.tolist()
        return wanted, sorted((e for e in missing if e not in flying), key=lambda e: (-wanting[e], e))


def attach(model: torch.nn.Module, layers: Sequence, min_tokens: int) -> int:
    """Give each offloaded layer of ``layers`` (run order) its look at the next one; returns how many got one.

    The next layer's router is the ``gate`` module beside its experts (as for fate's look-ahead); a layer
    whose next one keeps every expert resident, or has no router found, gets none.
    """
    linked = 0
    for layer, nxt in zip(layers, layers[1:]):
        layer.layer_ahead = None
        if nxt.slots is None or nxt.slots.fully_resident:
            continue
        gate_name = nxt.layer_name.rsplit(".experts", 1)[0] + ".gate"
        try:
            gate = model.get_submodule(gate_name)
        except AttributeError:
            logger.warning("no router found at %s; layer %d is not loaded ahead", gate_name, nxt.layer_idx)
            continue
        layer.layer_ahead = LayerAhead(layer, nxt, gate, min_tokens)
        linked += 1
    return linked
