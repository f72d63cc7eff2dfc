"""One slot pool for every MoE layer: a layer takes slots from the others as it needs them.

With a pool per layer, each layer holds a fixed share of the budget (4 of 16
experts at 25%), so a prefill needing every expert of a layer runs in passes
that reload experts, and a layer whose routing spreads wide misses as often as
one whose routing is concentrated. With one pool, the layer that runs takes
what it needs (up to :attr:`SharedPool.pass_capacity` at once) from the
experts the whole model is least likely to need soon.

Replacement (:meth:`SharedPool.choose_victim`): evict the resident expert whose
next use is expected farthest, counted in MoE layers run from now: the layers
until its own layer runs next, plus a whole model's layers for every token it
is expected to skip, from its use rate: ``decay``'s count (halving every
``half_life_steps`` steps, kept after eviction) plus, where the layer's policy
predicts (``nextuse``: what followed the step's token, or its routing, before,
and the earlier steps whose routing matched the running one's over the layers
run so far), :data:`PREDICTED_USE_WEIGHT` times the uses it predicts over the
layer's next steps. A prediction only brings a use nearer, so the candidates
are scored farthest by counts first and their layers asked for predictions
only until none left could be the victim.

Replayed, one cache per sequence (``scripts/measure/shared_pool_replay.py``,
``docs/bench/shared-pool/``), misses per token at 25% / 50% of each layer's
experts, the pool on counts alone -> with ``nextuse``'s predictions (LRU per
layer; Belady's over the pool): trained tiny-mixtral 2.64 / 0.70 -> 2.45 / 0.69
(3.66 / 0.91; 1.84 / 0.56); Mixtral humaneval 41.91 / 24.85 -> 37.14 / 21.11
(38.72 / 24.31; 24.88 / 11.97); gsm8k 42.76 / 25.60 -> 40.07 / 23.59 (42.14 /
25.75; 26.82 / 12.59); Qwen1.5-MoE 13.25 / 7.84 -> 13.23 / 7.79 (13.85 / 8.45;
7.69 / 3.46). On counts alone the pool loses to LRU per layer on Mixtral's
traces, whose experts are used nearly uniformly (frequency says little there);
the path neighbours carry the predictions' gain (without them humaneval
stays at 41.77 / 24.80). Predictions cost the engine's thread work at every
eviction: the engine asks for them only where experts are large
(``integration/setup.py``).

Contract, as :class:`~vllm_moe_offload.core.cache.SlotMap`'s: the pool never
holds more experts than slots; a view's ``pinned`` experts are never evicted;
nor are experts whose load is in flight (each view's :attr:`PooledSlotMap.loading`),
nor, for another layer's admission, the experts of the layer that runs now
(:meth:`SharedPool.begin_layer`). No torch, no vLLM.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable

import numpy as np

from vllm_moe_offload.core.cache import Admission, ReplacementPolicy, SlotMap

#: the use count's half-life, in steps: ``decay``'s (tuned on Mixtral humaneval, see ``core/frequency.py``);
#: 8 and 128 replayed slightly worse on tiny-mixtral's routing (a scratch replay of this rule: 2.73 / 2.74
#: misses per token against 2.65 at 32)
HALF_LIFE_STEPS = 32.0

#: pools of up to this many slots choose a victim resident by resident; larger ones score the whole pool in
#: array operations. Measured in the engine (tm-x16, 32 slots): about 20 us per eviction by the loop, 80 by arrays
#: (a handful of small-array operations cost more than 32 residents' arithmetic); outside it, at 1536 slots
#: (48 layers x 128 experts) 536 us by the loop and 58 by arrays, at 384 slots 292 and 26
LOOP_MAX_SLOTS = 128

#: the weight of a layer's predicted uses in an expert's use rate, where the layer's policy predicts them
#: (``nextuse``'s :meth:`~vllm_moe_offload.core.predictive.NextUsePolicy.predicted_uses`). In a scratch replay
#: (misses per token at 25% / 50%), 0.3 and 0.5 were within 1% of each other on Mixtral humaneval and
#: tiny-mixtral; on humaneval 0.2 up to 1% worse, 0.7 up to 4% and 1.0 up to 7%
PREDICTED_USE_WEIGHT = 0.3


class SharedPool:
    """Slot ids ``0..num_slots-1`` shared by ``num_layers`` layers of ``num_experts`` experts each."""

    def __init__(
        self, num_layers: int, num_experts: int, num_slots: int, top_k: int,
        half_life_steps: float = HALF_LIFE_STEPS,
    ) -> None:
        if num_layers < 1 or num_experts < 1:
            raise ValueError(f"a shared pool needs layers and experts, got {num_layers} x {num_experts}")
        if not top_k <= num_slots < num_layers * num_experts:
            raise ValueError(
                f"a shared pool of {num_slots} slots for {num_layers} x {num_experts} experts: give at least "
                f"top_k ({top_k}) and fewer than every expert (then no layer needs another's slots)"
            )
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.num_slots = num_slots
        #: the most experts one layer may need at once: all of its own, at most half the pool (the other
        #: half stays free for loads of other layers in flight, which hold their slots), never under top_k
        self.pass_capacity = min(num_experts, max(top_k, num_slots // 2))
        #: slots other layers' loads in flight may hold while a layer runs a full pass
        self.in_flight_allowance = num_slots - self.pass_capacity
        self._free = list(range(num_slots - 1, -1, -1))
        if half_life_steps <= 0:
            raise ValueError(f"half_life_steps must be positive, got {half_life_steps}")
        # every (layer, expert)'s use count, halving every half_life_steps of its layer's steps, decayed
        # lazily as ``decay``'s (core/frequency.py): the count as of step ``_at`` of its layer. Arrays, so that a
        # large pool's victim is chosen in a few array operations over the whole pool (``LOOP_MAX_SLOTS``)
        self._factor = 0.5 ** (1.0 / half_life_steps)  # decay per step
        self._uses = np.zeros((num_layers, num_experts))
        self._at = np.zeros((num_layers, num_experts), dtype=np.int64)
        self._resident = np.zeros((num_layers, num_experts), dtype=bool)  # kept by the views
        self._rate = 1.0 - self._factor  # decayed count -> uses per step
        self.current = 0  # the layer that runs now
        self.views = [PooledSlotMap(self, ordinal) for ordinal in range(num_layers)]

    def view(self, ordinal: int) -> PooledSlotMap:
        """The slot map of the ``ordinal``-th layer (its position among the pool's layers, in run order)."""
        return self.views[ordinal]

    def begin_layer(self, ordinal: int) -> None:
        """Layer ``ordinal`` starts its forward: distances count from it, and its experts stay."""
        self.current = ordinal

    def in_flight_elsewhere(self) -> int:
        """Slots held by loads in flight of the layers other than the one that runs: what
        :attr:`in_flight_allowance` bounds (the running layer's own loads are part of its pass)."""
        return sum(len(view.loading()) for view in self.views if view.ordinal != self.current)

    def free_slots(self) -> int:
        return len(self._free)

    def expected_next_use(self, ordinal: int, expert: int) -> float:
        """Layers run from now until ``expert`` of layer ``ordinal`` is expected to be used again."""
        return self._next_use(ordinal, expert, self._predicted_uses(ordinal).get(expert, 0.0))

    def _next_use(self, ordinal: int, expert: int, predicted: float) -> float:
        """:meth:`expected_next_use` with the layer's ``predicted`` uses of ``expert`` given (0.0: by counts)."""
        rate = min(1.0, self._decayed_uses(ordinal, expert) * self._rate + PREDICTED_USE_WEIGHT * predicted)
        until_layer = (ordinal - self.current - 1) % self.num_layers + 1  # its own layer next runs in 1..L layers
        if rate <= 0.0:
            return float("inf")
        return until_layer + self.num_layers * (1.0 / rate - 1.0)

    def choose_victim(
        self, requester: int, pinned: Collection[int], spare_useful: bool = False,
    ) -> tuple[int, int] | None:
        """The (layer ordinal, expert) to evict for an admission into layer ``requester``; None: none may go.

        Never: the requester's ``pinned`` experts, any load in flight, or (for another layer's admission)
        an expert of the layer running now; with ``spare_useful`` (a prefetch) no expert expected to be used
        no later than the prefetched one would be (:meth:`prefetch_horizon`): a guess must not push out what
        is needed before it. Ties: the lowest layer ordinal, then the lowest id.

        The rule was each layer's own judgement, :meth:`PooledSlotMap.useful` (used within the last 2
        steps); in a batch every expert is, so a prediction for the next layer, right 86% of the time on
        ``tm-x16``'s 32-request batch, could evict nothing: the layer that just ran, whose experts are next
        needed a whole model pass later, kept them while the next layer loaded its own on demand.
        """
        horizon = self.prefetch_horizon(requester) if spare_useful else None
        if self.num_slots <= LOOP_MAX_SLOTS:
            return self._victim_by_loop(requester, pinned, horizon)
        return self._victim_by_arrays(requester, pinned, horizon)

    def prefetch_horizon(self, requester: int) -> int:
        """Layers run from now until layer ``requester`` runs next: when an expert prefetched for it is used."""
        return (requester - self.current - 1) % self.num_layers + 1

    def _victim_by_loop(self, requester: int, pinned: Collection[int], horizon: float | None) -> tuple[int, int] | None:
        """:meth:`choose_victim` resident by resident.

        :meth:`_next_use` by counts, inlined over plain lists: through the arrays' ``item`` it cost about
        half a microsecond per resident, some 40 us per eviction at 64 slots, on the engine's thread.
        """
        keys: list[tuple[float, int, int]] = []
        uses, at = self._uses.tolist(), self._at.tolist()
        factor, per_use, layers = self._factor, self._rate, self.num_layers
        for view in self.views:
            ordinal = view.ordinal
            if ordinal == self.current and requester != self.current:
                continue
            held = view.loading()
            step, row_uses, row_at = view._step, uses[ordinal], at[ordinal]
            until_layer = (ordinal - self.current - 1) % layers + 1
            for expert in view.resident_keys():
                if expert in held or (ordinal == requester and expert in pinned):
                    continue
                # as _next_use(ordinal, expert, 0.0)
                rate = min(1.0, row_uses[expert] * factor ** (step - row_at[expert]) * per_use)
                next_use = until_layer + layers * (1.0 / rate - 1.0) if rate > 0.0 else float("inf")
                if horizon is not None and next_use <= horizon:
                    continue  # a prediction only brings it nearer
                keys.append((next_use, -ordinal, -expert))
        keys.sort(reverse=True)
        return self._farthest(keys, horizon)

    def _farthest(
        self, keys: Iterable[tuple[float, int, int]], horizon: float | None = None,
    ) -> tuple[int, int] | None:
        """The victim among candidates given as ``(next use by counts, -ordinal, -expert)``, farthest first.

        A predicted use only brings an expert's next use nearer, so the candidates are scored with their
        layers' predictions in that order until the next one's score by counts cannot beat the best found:
        usually the first, which asks one layer's policy for its predictions instead of every layer's.
        ``horizon`` (a prefetch's): None when the farthest, predictions counted, is used no later than that.
        """
        best: tuple[float, int, int] | None = None
        for key in keys:
            if best is not None and key <= best:
                break
            ordinal, expert = -key[1], -key[2]
            predicted = self._predicted_uses(ordinal).get(expert, 0.0)
            if predicted:
                key = (self._next_use(ordinal, expert, predicted), key[1], key[2])
            if best is None or key > best:
                best = key
        if best is None or (horizon is not None and best[0] <= horizon):
            return None  # a predicted use brought the farthest within the horizon: so is every other
        return -best[1], -best[2]

    def _victim_by_arrays(self, requester: int, pinned: Collection[int], horizon: float | None) -> tuple[int, int] | None:
        """:meth:`choose_victim` over the whole pool in array operations."""
        eligible = self._resident.copy()
        if requester != self.current:
            eligible[self.current] = False
        for view in self.views:
            held = view.loading()
            if held:
                eligible[view.ordinal, list(held)] = False
        if pinned:
            eligible[requester, [e for e in pinned if 0 <= e < self.num_experts]] = False
        scores = self._next_use_all().ravel()
        if horizon is not None:
            eligible &= (scores > horizon).reshape(eligible.shape)  # a prediction only brings them nearer
        if not eligible.any():
            return None
        first = int(np.argmax(np.where(eligible.ravel(), scores, -np.inf)))  # ties: the first, row-major
        ordinal, expert = divmod(first, self.num_experts)
        if not self._predicted_uses(ordinal).get(expert):  # the farthest by counts has no predicted use
            return ordinal, expert
        candidates = np.flatnonzero(eligible.ravel())
        # farthest by counts first; ties: the lowest ordinal, then the lowest id (row-major order)
        order = candidates[np.lexsort((candidates, -scores[candidates]))]
        keys = ((float(scores[i]), -(i // self.num_experts), -(i % self.num_experts)) for i in order.tolist())
        return self._farthest(keys, horizon)  # scored lazily: usually the first key decides

    def _next_use_all(self) -> np.ndarray:
        """:meth:`_next_use` by counts of every (layer ordinal, expert), ``[L, E]``, the same arithmetic."""
        steps = np.array([view._step for view in self.views], dtype=np.int64)[:, None]
        rate = np.minimum(1.0, self._uses * self._factor ** (steps - self._at) * self._rate)
        ordinals = np.arange(self.num_layers)[:, None]
        until_layer = (ordinals - self.current - 1) % self.num_layers + 1
        with np.errstate(divide="ignore"):
            scores = until_layer + self.num_layers * (1.0 / rate - 1.0)
        scores[rate <= 0.0] = np.inf
        return scores

    def _victim(self, requester: int, pinned: Collection[int], spare_useful: bool) -> tuple[int, int] | None:
        """What an admission into ``requester`` would evict (None: a free slot); raises when nothing may go."""
        if self._free:
            return None
        victim = self.choose_victim(requester, pinned, spare_useful)
        if victim is None:
            raise RuntimeError(
                f"all {self.num_slots} slots of the shared pool hold experts a pass needs or loads in flight"
                + (" or experts needed before the prefetched one" if spare_useful else "")
            )
        return victim

    def _take(self, requester: int, victim: tuple[int, int] | None, evictor: object = None) -> int:
        """A slot for ``requester``: a free one, or ``victim``'s (its owner told ``evictor`` when another's)."""
        if victim is None:
            return self._free.pop()
        ordinal, expert = victim
        return self.views[ordinal].evict(expert, notify=ordinal != requester, evictor=evictor)

    def _release(self, slot: int) -> None:
        self._free.append(slot)

    def _predicted_uses(self, ordinal: int) -> dict[int, float]:
        """Layer ``ordinal``'s predicted uses over its next steps, where its policy predicts them, else none."""
        predict = getattr(self.views[ordinal].policy, "predicted_uses", None)
        return predict() if predict is not None else {}

    def _decayed_uses(self, ordinal: int, expert: int) -> float:
        """The use count of ``expert`` of layer ``ordinal`` as of its layer's current step."""
        step = self.views[ordinal]._step
        return self._uses.item(ordinal, expert) * self._factor ** (step - self._at.item(ordinal, expert))

    def _count(self, ordinal: int, expert: int) -> None:
        self._uses[ordinal, expert] = self._decayed_uses(ordinal, expert) + 1.0
        self._at[ordinal, expert] = self.views[ordinal]._step


class PooledSlotMap(SlotMap):
    """One layer's view of a :class:`SharedPool`: a :class:`~vllm_moe_offload.core.cache.SlotMap` whose slots
    are the pool's.

    ``num_slots`` is the most this layer may hold in one pass (:attr:`SharedPool.pass_capacity`); how many it
    holds between passes depends on the others. ``policy`` (the configured replacement policy, sized to the
    layer's share of the budget) is told about accesses and evictions and decides :meth:`useful` and the warm
    set; the pool chooses victims.
    """

    def __init__(self, pool: SharedPool, ordinal: int) -> None:
        # not SlotMap.__init__: the slots and the free list are the pool's
        self.pool = pool
        self.ordinal = ordinal
        self.num_experts = pool.num_experts
        self.num_slots = pool.pass_capacity
        self.policy: ReplacementPolicy | None = None  # set by the owner (:meth:`attach`)
        #: experts of this layer whose load is in flight (set by the runtime; the simulator has none)
        self.loading: Callable[[], Collection[int]] = tuple
        #: called with an expert another layer's admission evicted and that admission's ``evictor`` (the runtime
        #: forgets its slot, and remembers a prefetch's prediction)
        self.on_evicted: Callable[[int, object], None] = lambda expert, evictor: None
        self._slot_of: dict[int, int] = {}
        self._step = 0
        self._used_at: dict[int, int] = {}

    def attach(self, policy: ReplacementPolicy) -> PooledSlotMap:
        self.policy = policy
        return self

    def resident_keys(self) -> list[int]:
        return list(self._slot_of)

    def spare_slots(self) -> int:
        """Slots a prefetch into this layer may take without evicting anything useful of its own: free ones,
        its own not useful ones, and the other layers' residents (up to what loads in flight may hold)."""
        others = sum(len(view) for view in self.pool.views if view is not self)
        room = self.pool.free_slots() + others + sum(1 for e in self._slot_of if not self.useful(e))
        return max(0, min(room, self.pool.in_flight_allowance - self.pool.in_flight_elsewhere()))

    def admit(self, expert: int, pinned: Collection[int] = (), spare_useful: bool = False,
              evictor: object = None) -> Admission:
        """Reserve a pool slot for non-resident ``expert``; the victim may be another layer's.

        Returns ``Admission(slot, evicted)`` where ``evicted`` is this layer's expert that left, if the
        victim was this layer's (another layer's victim is reported through its ``on_evicted``, with
        ``evictor``: who admits, opaque here).
        ``spare_useful`` (a prefetch): every expert expected to be used before this layer runs next counts as
        pinned (:meth:`SharedPool.choose_victim`). Raises ``RuntimeError`` when
        nothing may leave; nothing changes then.
        """
        if expert in self._slot_of:
            raise ValueError(f"expert {expert} is already resident")
        victim = self.pool._victim(self.ordinal, pinned, spare_useful)  # nothing changes on refusal
        self.policy.before_admit(expert)
        slot = self.pool._take(self.ordinal, victim, evictor)
        evicted = victim[1] if victim is not None and victim[0] == self.ordinal else None
        self._slot_of[expert] = slot
        self.pool._resident[self.ordinal, expert] = True
        return Admission(slot, evicted)

    def touch(self, expert: int, hit: bool, demand: bool = True) -> None:
        super().touch(expert, hit, demand)
        if demand:
            self.pool._count(self.ordinal, expert)

    def drop(self, expert: int) -> None:
        slot = self._slot_of.pop(expert, None)
        if slot is not None:
            self.pool._resident[self.ordinal, expert] = False
            self._used_at.pop(expert, None)
            self.policy.on_evict(expert)
            self.pool._release(slot)

    # -- the pool's side --

    def evict(self, expert: int, notify: bool, evictor: object = None) -> int:
        """Remove ``expert`` for the pool's replacement; returns its slot (not freed: the admission takes it).

        ``notify``: another layer admits (``evictor``), so this layer's owner hears of it (:attr:`on_evicted`); a
        layer's own admission reports its victim in the :class:`Admission`.
        """
        slot = self._slot_of.pop(expert)
        self.pool._resident[self.ordinal, expert] = False
        self._used_at.pop(expert, None)
        self.policy.on_evict(expert)
        if notify:
            self.on_evicted(expert, evictor)
        return slot


def serve_step(slot_map: SlotMap, needed: list[int]) -> int:
    """Replay one step of one layer (batch-1 view): admit the misses with the step's experts pinned, count
    every use, end the step. Returns the misses. For a :class:`PooledSlotMap`, tell the pool the layer runs
    (:meth:`SharedPool.begin_layer`) first."""
    misses = 0
    for expert in needed:
        if slot_map.slot_of(expert) is None:
            slot_map.admit(expert, pinned=needed)
            misses += 1
        slot_map.touch(expert, hit=False)
    slot_map.end_step()
    return misses
