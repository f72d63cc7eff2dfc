"""The slot pool of one MoE layer: fast-memory buffers that hold resident experts.

The fused-experts kernel reads ``w13 [S, 2I', H']`` and ``w2 [S, H', I']`` and
``topk_ids`` in ``[0, S)``; :meth:`LayerSlots.remap` turns the router's expert
ids into slot ids, and :meth:`LayerSlots.ensure` makes a set of experts
resident first (loading misses through the transfer engine and waiting for
them; the wait is the stall). :meth:`LayerSlots.prefetch` starts loads without
waiting, while an earlier layer computes. A slot is never read while a load
writes it, and never evicted while a load is pending: a load maps its expert
only once it is done. The next :meth:`ensure` of this layer (the real routing is
known then) cancels queued prefetches of experts the step does not need, freeing
their slots, and waits only for the loads of the experts it needs, plus the
oldest other loads in flight while its misses lack a slot; the rest land in the
background (or at a later call).

Faults. A load that raises (a short read, a file changed since start-up) frees
its slot; a load that outlives ``load_timeout_s`` keeps its slot reserved until
its thread finishes (so a late write never lands in a slot that holds another
expert) and is "late" until then. Either way :meth:`ensure` raises
:class:`ExpertLoadError` naming the experts that are not resident, after making
every other requested expert resident, so the caller can compute the tokens
that do not need them.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from concurrent.futures import Future

import torch

from vllm_moe_offload.core.cache import SlotMap
from vllm_moe_offload.core.link import DEMAND, LoadPriority, admit_prefetches, outranking
from vllm_moe_offload.core.prefetch_gate import PrefetchGate
from vllm_moe_offload.core.shared_pool import PooledSlotMap
from vllm_moe_offload.core.stats import LayerStats
from vllm_moe_offload.runtime.memory import ALIGN_BYTES, aligned_empty
from vllm_moe_offload.runtime.tiers import ExpertSource
from vllm_moe_offload.runtime.transfer import LinkEmulator, Loaded, TransferEngine

logger = logging.getLogger("vllm.moe_offload.slots")


def slot_pool(num_slots: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An empty pool ``[num_slots, *shape]`` of one expert tensor.

    On the host, when one slot's bytes are a multiple of the direct-I/O block, the
    pool starts aligned too, so every slot is: a store in kernel layout reads an
    expert straight into its slot (``TensorReader.read_into``), no staging, no copy;
    and it asks for huge pages (``memory.aligned_empty``).
    """
    one_slot_bytes = math.prod(shape) * dtype.itemsize
    if torch.device(device).type == "cpu" and one_slot_bytes % ALIGN_BYTES == 0:
        return aligned_empty((num_slots, *shape), dtype, huge_pages=True)
    return torch.empty((num_slots, *shape), dtype=dtype, device=device)


#: while a prediction's gate is closed, one prediction in this many is still made (and scored), so its
#: precision keeps being measured at a quarter of the cost
CLOSED_SAMPLE_EVERY = 4


class ExpertLoadError(RuntimeError):
    """Experts could not be brought into their slots; the tokens that need them fail.

    ``experts`` are the router ids that are not resident; every other expert of
    the failed :meth:`LayerSlots.ensure` call is.
    """

    def __init__(self, message: str, layer_idx: int, experts: Sequence[int]) -> None:
        super().__init__(message)
        self.layer_idx = layer_idx
        self.experts = tuple(experts)


class LayerSlots:
    def __init__(
        self,
        layer_idx: int,
        w13_slots: torch.Tensor,  # [S, 2I', H']
        w2_slots: torch.Tensor,  # [S, H', I']
        slot_map: SlotMap | PooledSlotMap,
        source: ExpertSource,
        engine: TransferEngine,
        link: LinkEmulator,
        load_timeout_s: float | None = None,
        extra_slots: Sequence[torch.Tensor] = (),  # [S, ...] each: the kernel's other per-expert tensors
        share: int | None = None,
    ) -> None:
        self.layer_idx = layer_idx
        #: longest wait for one load before the experts it brings count as failed (None: no limit)
        self.load_timeout_s = load_timeout_s
        self.w13_slots = w13_slots
        self.w2_slots = w2_slots
        #: a quantized layer's other pools (FP8: the block scales), in the order the source fills them
        self.extra_slots = tuple(extra_slots)
        self.slot_map = slot_map
        self.source = source
        self.engine = engine
        self.link = link
        #: the pools are the model's, shared by every layer (``core/shared_pool.py``): slot ids are the pool's,
        #: another layer's admission may evict this layer's experts, and a pass may hold up to the pool's
        #: pass capacity; ``share`` is this layer's part of the budget, for the reports
        self.pooled = isinstance(slot_map, PooledSlotMap)
        #: the most experts this layer holds at once (its pool's rows, or a shared pool's pass capacity)
        self.num_slots = slot_map.num_slots if self.pooled else w13_slots.shape[0]
        self.expert_bytes = sum(t.nbytes for t in self.pools) // w13_slots.shape[0]  # one slot's, scales included
        # expert id -> slot id, -1 when not resident. A list on the host (decisions are made there; setting
        # one element of a tensor costs about ten microseconds, of a list nanoseconds), mirrored to a tensor on
        # the kernel's device when a pass needs it after a change (remap)
        self._expert_to_slot: list[int] = [-1] * slot_map.num_experts
        self._device_table: torch.Tensor | None = None
        #: how the layer's kernel is called (``integration/cpu_kernel.py``), known after its first call
        self.kernel_path: str | None = None
        self._pending: dict[int, tuple[int, Future]] = {}  # expert -> (slot, load) started by prefetch
        self._prefetched: set[int] = set()  # resident by prefetch, not needed since
        self._step_needs: set[int] | None = None  # every expert this step needs, once known
        self._demand: set[int] = set()  # loads started by start_loads: misses whose tokens wait
        #: the source also has a low-precision copy of each expert (int4+int2 stores)
        self.has_low_precision = bool(getattr(source, "has_low_precision", False))
        self._low: set[int] = set()  # resident in low precision: good for one prefill pass only
        # this layer's predictions for its next pass, by distance (layers ahead they were made)
        self._predictions: dict[int, set[int]] = {}
        #: this step's predictions by predictors other than a router (``prefetch(predictor=...)``), by predictor
        self._other_predictions: dict[str, set[int]] = {}
        self._unused_counted_at = -1  # the step whose first prediction counted the last step's unused prefetches
        #: how often gated predictions of missing experts were right (``prefetch(gate=...)``), and this step's
        #: gated predictions by their key (:meth:`gate_key`), scored when the layer runs
        self.prefetch_gate = PrefetchGate()
        self._gated: dict[tuple, tuple[tuple, set[int]]] = {}
        self._closed_calls = 0  # predictions asked for while the gate was closed (sample_closed_prediction)
        #: this layer's experts a gated prediction's load evicted: expert -> (that layer's gate, the prediction's
        #: key, this layer's step count then); needed again by this layer's next step, the load is a harm
        self._victims: dict[int, tuple[PrefetchGate, tuple, int]] = {}
        self._step_marks: tuple[str, float, int] | None = None  # this step's kind, stall and misses at its start
        self._identity: bool | None = None  # decided once, after warm()
        #: seconds one expert load took, smoothed (for the over-fetch depth)
        self.load_s_ema: float | None = None
        #: when this layer's running (or last) step queued its first demand load, when its last step ended, and
        #: when the last step's own demand loads were over (its start where it had none) (``time.perf_counter``;
        #: None: not yet): the link's free time between two layers (``integration/layer_ahead.py``)
        self.first_demand_s: float | None = None
        self.ended_s: float | None = None
        self.own_loads_done_s: float | None = None
        #: every expert the last step that ended needed (None: none known), for predictors that learn from it
        #: (``integration/layer_ahead.py``)
        self.last_step_needs: set[int] | None = None
        self._began_s = 0.0
        self._demand_done_s: float | None = None  # the running step's latest demand load's end (an I/O thread's)
        #: run once this step's own loads are queued (:meth:`after_own_loads`)
        self._after_own_loads: Callable[[], None] | None = None
        #: predicted experts not resident when a step's first prediction came, smoothed (look-ahead depth)
        self.prefetch_missing_ema: float | None = None
        if self.pooled:
            slot_map.loading = self._pending.keys  # loads in flight hold their slots, whoever admits
            slot_map.on_evicted = self._evicted_by_other  # another layer's admission took one of this layer's slots
        reported = share if share is not None else self.num_slots
        self.stats = LayerStats(
            layer_idx=layer_idx,
            num_slots=reported,
            slot_bytes=self.expert_bytes * reported,
        )

    @property
    def pools(self) -> tuple[torch.Tensor, ...]:
        """Every pool the kernel reads: ``(w13, w2, *extra)``, each ``[S, ...]``."""
        return (self.w13_slots, self.w2_slots, *self.extra_slots)

    def warm(self, experts: Sequence[int] | None = None) -> None:
        """Load ``experts`` (default: the policy's warm set, everything when every expert has a slot).

        Runs at start-up: a failed load raises :class:`ExpertLoadError`.
        """
        # a shared pool's layer warms its share only: the others' shares are theirs
        experts = list(self.slot_map.policy.warm_set() if experts is None else experts)[: self.stats.num_slots]
        if not experts:
            return
        failures = self._load_missing(experts, pinned=set(experts))
        if failures:
            expert, exc = failures[0]
            raise ExpertLoadError(
                f"layer {self.layer_idx}: loading expert {expert} at start-up failed: {exc}",
                self.layer_idx, [e for e, _ in failures],
            ) from exc

    @property
    def fully_resident(self) -> bool:
        return not self.pooled and self.num_slots >= self.slot_map.num_experts

    @property
    def identity(self) -> bool:
        """Every expert is resident in the slot of its own id, for good (budget 100%).

        Then the kernel can take the router's ids as they are; no step counts
        hits or misses because none is looked up.
        """
        if self._identity is None:
            experts = range(self.slot_map.num_experts)
            self._identity = (
                self.fully_resident
                and all(self.slot_map.slot_of(e) == e for e in experts)
                and all(self.slot_map.policy.keep_after_step(e) for e in experts)
            )
        return self._identity

    def begin_layer(self, kind: str | None = None) -> None:
        """This layer's forward starts: tick the engine's layer clock (the compute between MoE layers, for
        the link schedule and the prefetch gate) and hold queued prefetches until this layer's own loads are
        queued (or it has none, or it waits): the prefetches a layer issues for later layers come before its
        own routing is served, and an idle I/O thread would otherwise start one of them first. ``kind``
        (``core/prefetch_gate.step_kind``): the step's, whose stall per demand miss the gate learns at
        :meth:`end_step`."""
        self._step_marks = None if kind is None else (kind, self.stats.stall_s, self.stats.misses)
        self.first_demand_s = None
        self._began_s, self._demand_done_s = time.perf_counter(), None
        if self.pooled:
            self.slot_map.pool.begin_layer(self.slot_map.ordinal)
        started = getattr(self.engine, "layer_started", None)
        if started is not None:
            started(self.stats, hold=not self.fully_resident)

    def after_own_loads(self, work: Callable[[], None]) -> None:
        """Run ``work`` (once) as soon as this step's own missing experts are admitted and their loads queued:
        at the end of the first :meth:`start_loads`, after :meth:`ensure` submitted its misses (before it
        waits), or at an :meth:`ensure` that finds nothing missing; at :meth:`end_step` at the latest.

        For loads this layer makes for the next one (``integration/layer_ahead.py``): made first, they took
        the shared pool's free slots, and the layer's own loads then evicted residents instead."""
        self._after_own_loads = work

    def _own_loads_queued(self) -> None:
        work, self._after_own_loads = self._after_own_loads, None
        if work is not None:
            work()

    def _release_prefetches(self) -> None:
        release = getattr(self.engine, "release_prefetches", None)
        if release is not None:
            release()

    def _waiting_for(self, jobs: Iterable[Future]) -> None:
        """The layer is about to wait for ``jobs``: queued prefetches among them become demand loads
        (they run first, even while prefetches are held); a job the engine cannot promote releases the hold."""
        promote = getattr(self.engine, "promote", None)
        for job in jobs:
            if not job.done() and (promote is None or not promote(job)) and not job.running():
                self._release_prefetches()  # never wait for a load that is held

    def prefetch(
        self, experts: Sequence[int], spare_useful: bool = False, distance: int = 1,
        scores: Sequence[float] | None = None, gate: str | None = None, backlog_s: float = 0.0,
        predictor: str | None = None, keep: Collection[int] = (),
    ) -> None:
        """Start loading ``experts`` (most wanted first) without waiting; also the prediction to score.

        At most ``num_slots`` are kept; experts already resident or in flight cost nothing.
        ``spare_useful`` (Fate): a load may take only a free slot or one whose expert the
        cache policy deems not useful (:meth:`SlotMap.useful`); at the first expert with no
        such slot the rest of the prediction is skipped (each skipped expert that is needed
        becomes an on-demand miss, as without prediction). ``distance``: layers between the
        layer that predicted and this one. Several predictions of one step may arrive
        (deeper look-ahead); the nearest is scored as ``predicted`` and its loads win:
        queued loads of a farther prediction that the nearer one drops are cancelled.
        Prefetches queue behind every demand load, the nearest layer's first, then by
        ``scores`` (else in the prediction's order); a layer that waits for one promotes it.

        With a scheduled link (the engine's ``schedule_prefetches``): only the experts
        :func:`admit_prefetches` admits are loaded (the rest count as ``prefetch_refused``); ``scores``
        (``[E]``, the prediction's score of every expert) keep residents scored at least
        as high as a prefetch from being evicted for it (:func:`outranking`).

        ``gate`` (a kind of step: ``"token"``, ``"batch"``): the missing experts are loaded only where this
        layer's predictions of that kind at that distance have been right often enough to pay for the link
        time a wrong one costs (``core/prefetch_gate.py``; the rest count as ``prefetch_gated``); the
        prediction is scored either way; ``backlog_s``: link time its loads would queue behind (see
        :meth:`prefetch_pays`). ``predictor``: which predictor made it, where not a router's (its precision is
        kept apart, :meth:`gate_key`; ``integration/token_prefetch.py``'s ``"token-table"``). ``keep``: other
        experts the same prediction expects the layer to need (resident ones): never evicted for these loads,
        neither loaded nor scored.
        """
        self._collect_finished()
        wanted = list(dict.fromkeys(experts))[: self.num_slots]
        if self._unused_counted_at != self.stats.steps:  # the step's first prediction: the last step's are over
            self._unused_counted_at = self.stats.steps
            self.stats.prefetch_unused += len(self._prefetched)
            self._prefetched.clear()
        pinned = set(wanted) | set(keep) | set(self._pending)
        todo = [e for e in wanted if self.slot_map.slot_of(e) is None]
        if predictor is not None:  # scored apart from the routers' (which the look-ahead depth follows)
            self._other_predictions[predictor] = set(wanted)
        else:
            if not self._predictions:  # a router's first this step: how many it finds missing
                ema = self.prefetch_missing_ema
                self.prefetch_missing_ema = len(todo) if ema is None else 0.9 * ema + 0.1 * len(todo)
            if self._predictions and distance < min(self._predictions):
                self._cancel_queued_prefetches(keep=set(wanted))
            self._predictions[distance] = set(wanted)
        if gate is not None:
            key = self.gate_key(distance, gate, predictor)
            self._gated[key] = (key, set(todo))  # scored when this layer runs
            if not self.prefetch_pays(distance, gate, backlog_s, predictor):
                self.stats.prefetch_gated += len(todo)
                todo = []
        if self.pooled:  # loads in flight hold pool slots: leave the running layer a full pass
            pool = self.slot_map.pool
            room = max(0, pool.in_flight_allowance - pool.in_flight_elsewhere())
            self.stats.prefetch_refused += max(0, len(todo) - room)
            todo = todo[:room]
        scheduled = getattr(self.engine, "schedule_prefetches", False)
        if scheduled:
            admitted = admit_prefetches(
                todo, self.expert_bytes, distance, self.engine.prefetch_backlog_bytes(), self.engine.rate,
                self.engine.clock.compute_s, lanes=self.engine.num_threads,
            )
            self.stats.prefetch_refused += len(todo) - admitted
            todo = todo[:admitted]
        clock = getattr(self.engine, "clock", None)
        for rank, expert in enumerate(todo):
            guard = pinned
            # behind every demand load (the layers that wait now), the nearest layer's first, then the most
            # confident (the prediction's order where it gives no scores)
            score = float(scores[expert]) if scores is not None else -float(rank)
            priority = LoadPriority(
                demand=False, needed_at=(clock.layers if clock is not None else 0) + distance, confidence=score,
                num_bytes=self.expert_bytes,
            )
            if scheduled and scores is not None:
                guard = pinned | outranking(score, self.slot_map.resident(), scores)
            cause = self.gate_key(distance, gate, predictor) if gate is not None else None
            if not self._start_load(expert, guard, spare_useful=spare_useful, priority=priority, cause=cause):
                if spare_useful:
                    self.stats.prefetch_skipped += 1
                break  # every slot holds a wanted (or useful) expert or a load in flight
            self.slot_map.touch(expert, hit=False, demand=False)
            self.stats.prefetch_loads += 1

    @staticmethod
    def gate_key(distance: int, kind: str, predictor: str | None = None) -> tuple:
        """The key the prefetch gate keeps a prediction's precision under: a router's ``(distance, kind)``,
        another predictor's ``(distance, kind, predictor)``."""
        return (distance, kind) if predictor is None else (distance, kind, predictor)

    def prefetch_pays(self, distance: int, kind: str, backlog_s: float = 0.0, predictor: str | None = None) -> bool:
        """Whether a ``kind`` prediction ``distance`` layers ahead would be loaded (``core/prefetch_gate.py``);
        ``backlog_s``: link time its loads would queue behind while the layers in between compute (the
        predicting batch's own loads), which comes off its lead; ``predictor``: see :meth:`prefetch`."""
        clock = getattr(self.engine, "clock", None)
        return self.prefetch_gate.pays(self.gate_key(distance, kind, predictor), distance, self.load_s_ema,
                                       clock and clock.compute_s, backlog_s, self.prefetch_gate.stall_per_miss(kind))

    def prediction_wanted(self, distance: int, kind: str | None, backlog_s: float = 0.0) -> bool:
        """Whether to make a ``kind`` prediction ``distance`` layers ahead at all: ungated (``kind`` None), the
        gate open, or one of the samples that keep a closed gate measured (a closed one's loads never start)."""
        return kind is None or self.prefetch_pays(distance, kind, backlog_s) or self.sample_closed_prediction()

    def sample_closed_prediction(self) -> bool:
        """Whether to make a prediction the gate will not load anyway, to keep measuring its precision: one
        call in :data:`CLOSED_SAMPLE_EVERY` (making one costs the predicting layer a router and a top-k)."""
        self._closed_calls += 1
        return self._closed_calls % CLOSED_SAMPLE_EVERY == 0

    def _cancel_queued_prefetches(self, keep: set[int]) -> None:
        """Cancel prefetch loads not yet started whose expert is not in ``keep``; free their slots.

        Only a thread pool's own future stops its job when cancelled before it runs;
        a wrapping future (the CUDA engine's) would not stop the copy into the slot,
        so those loads are left to land.
        """
        for expert, (_, job) in list(self._pending.items()):
            if expert in keep or expert in self._demand or type(job) is not Future or not job.cancel():
                continue
            del self._pending[expert]
            self.slot_map.drop(expert)
            self._forget(expert)
            self.stats.prefetch_loads -= 1
            self.stats.prefetch_cancelled += 1

    def missing(self, experts: Iterable[int]) -> list[int]:
        """Those of ``experts`` that are not resident now."""
        table = self._expert_to_slot
        return [e for e in experts if table[e] < 0]

    def num_missing(self, experts: Iterable[int]) -> int:
        """How many of ``experts`` are not resident now."""
        return len(self.missing(experts))

    def missing_load_s(self, experts: Iterable[int]) -> float:
        """Link time the experts of ``experts`` not resident take to load, at the measured load time (0.0
        until a load was timed). A batch's layer computes while its own missing experts load, and predictions
        it makes for later layers queue behind them (the prefetch gate's ``backlog_s``)."""
        if not self.load_s_ema or self.fully_resident:
            return 0.0
        return self.num_missing(experts) * self.load_s_ema

    def in_flight(self, experts: Iterable[int]) -> list[int]:
        """Those of ``experts`` whose load is running or queued (not yet readable)."""
        return [e for e in experts if e in self._pending]

    def start_loads(self, experts: Sequence[int], pinned: Collection[int], low: Collection[int] = ()) -> None:
        """Start loading those of ``experts`` that are not resident, in this order, without waiting.

        For misses whose tokens can wait while other tokens compute: the next
        :meth:`ensure` that needs them (or :meth:`wait_next`) waits for them; ensure
        counts them as misses. ``pinned`` experts (the pass's) are not evicted for
        them; ``low`` ones are loaded in low precision when the source has it.
        Queued prefetches the step does not need are cancelled first, so these
        loads do not queue behind wrong guesses.
        """
        self.score_prediction(pinned)  # the pass's needs, before its ensure calls split them
        self._cancel_queued_prefetches(keep=set(pinned) | (self._step_needs or set()))
        pinned = set(pinned) | set(self._pending)
        for expert in experts:
            if self.slot_map.slot_of(expert) is not None:
                continue
            if not self._start_load(expert, pinned, self.has_low_precision and expert in low):
                break  # slots held by late loads: ensure reports what cannot be loaded
            self._demand.add(expert)
        self._own_loads_queued()

    def _start_load(
        self, expert: int, pinned: set[int], low: bool = False, spare_useful: bool = False,
        priority: LoadPriority = DEMAND, cause: tuple | None = None,
    ) -> bool:
        """Admit ``expert`` (evicting outside ``pinned``) and submit its load; False when every slot is pinned.

        ``spare_useful``: useful experts count as pinned (prefetches, see :meth:`prefetch`). ``cause``: the
        key of the gated prediction this prefetch loads for; its victim, this layer's or another's, remembers
        it (:meth:`_note_victim`). A demand load of an expert such a prefetch evicted since this layer's last
        step counts against that prediction (``PrefetchGate.record_harm``).
        """
        evictor = None if cause is None else (self.prefetch_gate, cause)  # another layer's victim: _evicted_by_other
        try:
            admission = self.slot_map.admit(expert, pinned, spare_useful=spare_useful, evictor=evictor)
        except RuntimeError:
            return False
        if admission.evicted is not None:
            self._forget(admission.evicted)
            if evictor is not None:
                self._note_victim(admission.evicted, evictor)
        victim = self._victims.pop(expert, None)
        if victim is not None and priority.demand and self.stats.steps - victim[2] <= 1:
            victim[0].record_harm(victim[1])
        if priority.demand:
            if self.first_demand_s is None:
                self.first_demand_s = time.perf_counter()
            job = self.engine.submit(self._load, expert, admission.slot, low)
            job.add_done_callback(self._demand_load_over)
            self._pending[expert] = (admission.slot, job)
            self._release_prefetches()  # the layer's own loads are queued: prefetches may follow them
        else:
            job = self.engine.submit(self._load, expert, admission.slot, low, priority=priority)
            self._pending[expert] = (admission.slot, job)
        if low:
            self._low.add(expert)
            self.stats.low_precision_loads += 1
        return True

    def ensure(self, experts: Sequence[int], low: Collection[int] = (), counted: set[int] | None = None) -> None:
        """Make ``experts`` (distinct, at most ``num_slots``) resident; count hits and misses.

        Misses among ``low`` are loaded in low precision when the source has it
        (Fate: the least-needed experts of a prefill); an expert resident in low
        precision and not in ``low`` is loaded again in full. ``counted``: experts
        a pass computed in waves already counted (one need per pass and expert);
        their hits are not counted again (a load is always a miss), and the
        experts counted here join it.
        """
        counted = set() if counted is None else counted
        if len(experts) > self.num_slots:
            raise ValueError(f"{len(experts)} experts requested at once but layer has {self.num_slots} slots")
        if self._pending:
            # the routing is known: a queued guess the step does not need would only delay the loads behind it
            self._cancel_queued_prefetches(keep=set(experts) | (self._step_needs or set()))
            self._finish_pending(set(experts))
        if self._low:
            for expert in [e for e in experts if e in self._low and e not in low and e not in self._pending]:
                self.slot_map.drop(expert)  # upgrade: its int2 copy served a prefill, not this pass
                self._forget(expert)
        self.score_prediction(experts)
        missing = []
        # a load outlived its timeout, still running
        late = [e for e in experts if e in self._pending] if self._pending else []
        for expert in experts:
            if expert in self._pending:
                continue
            if self.slot_map.slot_of(expert) is None:
                missing.append(expert)
                continue
            if expert in self._demand:  # started by start_loads: a miss that had company
                self._demand.discard(expert)
                self.slot_map.touch(expert, hit=False)
                self.stats.misses += 1
                counted.add(expert)
                continue
            if expert in counted:
                continue
            counted.add(expert)
            self.slot_map.touch(expert, hit=True)
            if expert in self._prefetched:
                self._prefetched.discard(expert)
                self.stats.prefetch_hits += 1
            else:
                self.stats.hits += 1
        if not missing:
            self._release_prefetches()  # nothing of this layer's to load: queued prefetches may run
            self._own_loads_queued()
        self.stats.misses += len(missing) + len(late)
        counted.update(missing, late)
        self.stats.passes += 1
        failures: list[tuple[int, BaseException]] = []
        if missing:
            # loads in flight hold their slots: wait for the oldest ones only while the misses lack room
            self._make_room(len(missing), set(experts))
            pinned = set(experts) | set(self._pending)
            failures = self._load_missing(missing, pinned, low)
            for expert in missing:
                self.slot_map.touch(expert, hit=False)
        failures += [
            (e, TimeoutError(f"its load took longer than {self.load_timeout_s:g} s and is still running")) for e in late
        ]
        if failures:
            self.stats.failed_loads += len(failures)
            expert, exc = failures[0]
            raise ExpertLoadError(
                f"layer {self.layer_idx}: loading expert {expert} from the {self.source.tier.value} tier "
                f"failed: {exc}" + (f" (and {len(failures) - 1} more experts)" if len(failures) > 1 else ""),
                self.layer_idx, [e for e, _ in failures],
            ) from exc

    def wait_next(self, experts: Collection[int]) -> list[int]:
        """Wait until the first of the loads in flight of ``experts`` is over; map every load that is over.

        Returns those of ``experts`` whose load is over (landed, or failed: a failed
        load frees its slot and the expert is loaded again by the next :meth:`ensure`
        that needs it); empty when none of them is in flight, or none ended within
        ``load_timeout_s`` (the next :meth:`ensure` then reports the late ones). The
        wait is stall. With one I/O thread loads end in the order they were started.
        """
        jobs = {self._pending[e][1]: e for e in experts if e in self._pending}
        if not jobs:
            return []
        self._waiting_for(jobs)
        started = time.perf_counter()
        concurrent.futures.wait(jobs, timeout=self.load_timeout_s, return_when=concurrent.futures.FIRST_COMPLETED)
        self.stats.stall_s += time.perf_counter() - started
        over = [e for job, e in jobs.items() if job.done()]
        self._collect_finished()
        return over

    def predicted_by(self, predictor: str) -> bool:
        """Whether ``predictor`` (``prefetch(predictor=...)``) has predicted this layer's experts for its next step."""
        return predictor in self._other_predictions

    def score_prediction(self, experts: Sequence[int]) -> None:
        """Score the predictions for this step against ``experts``: the nearest overall, each by distance.

        The layer calls it once per step with every expert the step needs, before
        splitting it into passes; otherwise the first pass's needs are used.
        """
        if self._step_needs is None:
            self._step_needs = set(experts)
        if not self._gated and not self._predictions and not self._other_predictions:
            return
        needed = set(experts)
        for key, missing in self._gated.values():
            self.prefetch_gate.record(key, len(missing), len(missing & needed))
        self._gated = {}
        for predictor, predicted in self._other_predictions.items():  # the next-token table's, the layer before's
            self.stats.add_other(predictor, len(predicted), len(predicted & needed))
        self._other_predictions = {}
        if not self._predictions:
            return
        nearest = self._predictions[min(self._predictions)]
        self.stats.predicted += len(nearest)
        self.stats.predicted_right += len(nearest & needed)
        self.stats.needed_when_predicted += len(needed)
        for distance, predicted in self._predictions.items():
            self.stats.add_distance(distance, len(predicted), len(predicted & needed), len(needed))
        self._predictions = {}  # later passes of the same step are not predictions

    def finish_loads(self) -> None:
        """Wait for every load in flight (prefetches included) and map what arrived; the wait is stall."""
        self._finish_pending()

    def _finish_pending(self, needed: Collection[int] | None = None) -> None:
        """Wait for loads in flight (of ``needed`` experts, or all) and map what arrived.

        The wait is stall. A load still running after ``load_timeout_s`` stays
        pending (its slot reserved); :meth:`ensure` reports it as failed for
        this step. Loads not waited for stay pending, their slots reserved.
        """
        if not self._pending:
            return
        started = time.perf_counter()
        for expert, (slot, job) in list(self._pending.items()):
            if needed is not None and expert not in needed:
                if job.done():
                    self._finish(expert, slot, job)
                continue
            if self._wait(job, started):
                self._finish(expert, slot, job)
        self.stats.stall_s += time.perf_counter() - started

    def _room(self, pinned: Collection[int]) -> int:
        """Slots that could take a new expert now: free, or holding an expert outside ``pinned`` and not loading."""
        held = set(pinned) | set(self._pending)
        return self.num_slots - sum(e in held for e in self.slot_map.resident())

    def _make_room(self, count: int, pinned: set[int]) -> None:
        """Wait for loads in flight, oldest first, until ``count`` slots are free or evictable.

        A landed load becomes an ordinary resident (evictable unless ``pinned``).
        Loads not waited for keep running, their slots reserved. The wait is stall.
        """
        started = time.perf_counter()
        for expert, (slot, job) in list(self._pending.items()):
            if self._room(pinned) >= count:
                break
            if expert in pinned:  # a needed load past its timeout: landing it frees no slot
                continue
            if self._wait(job, started):
                self._finish(expert, slot, job)
        self.stats.stall_s += time.perf_counter() - started

    def _wait(self, job: Future, started: float) -> bool:
        """Wait for ``job`` until ``load_timeout_s`` after ``started``; True when it is done."""
        self._waiting_for([job])
        if self.load_timeout_s is None:
            concurrent.futures.wait([job])
            return True
        remaining_s = started + self.load_timeout_s - time.perf_counter()
        if not job.done() and remaining_s > 0:
            concurrent.futures.wait([job], timeout=remaining_s)
        return job.done()

    def _collect_finished(self) -> None:
        if not self._pending:
            return
        for expert, (slot, job) in list(self._pending.items()):
            if job.done():
                self._finish(expert, slot, job)

    def _finish(self, expert: int, slot: int, job: Future) -> None:
        del self._pending[expert]
        try:
            num_bytes, read_s = job.result()
        except Exception as exc:  # noqa: BLE001 - a failed prefetch is only a lost guess
            logger.warning("layer %d: load of expert %d failed (%s); it will be loaded on demand",
                           self.layer_idx, expert, exc)
            self.slot_map.drop(expert)
            self._demand.discard(expert)
            self._low.discard(expert)
            return
        self._expert_to_slot[expert] = slot
        self._device_table = None
        if expert not in self._demand:
            self._prefetched.add(expert)
        self._account(num_bytes, read_s)

    def _evicted_by_other(self, expert: int, evictor: tuple[PrefetchGate, tuple] | None) -> None:
        """Another layer's admission took ``expert``'s slot (a shared pool); a gated prediction's, remembered."""
        self._forget(expert)
        if evictor is not None:
            self._note_victim(expert, evictor)

    def _note_victim(self, expert: int, cause: tuple[PrefetchGate, tuple]) -> None:
        self._victims[expert] = (*cause, self.stats.steps)

    def _forget(self, expert: int) -> None:
        self._expert_to_slot[expert] = -1
        self._demand.discard(expert)
        self._low.discard(expert)
        if expert in self._prefetched:
            self._prefetched.discard(expert)
            self.stats.prefetch_unused += 1  # loaded ahead, evicted before any use
        self._device_table = None

    def _account(self, num_bytes: int, read_s: float) -> None:
        self.stats.add_read(self.source.tier.value, num_bytes)
        self.stats.read_s += read_s
        self.stats.loads += 1

    def _load_missing(
        self, experts: Sequence[int], pinned: set[int], low: Collection[int] = (),
    ) -> list[tuple[int, BaseException]]:
        """Load ``experts`` and wait; returns the (expert, error) of those that did not arrive."""
        late = len(self._pending)  # loads still running past their timeout hold their slots
        failures: list[tuple[int, BaseException]] = []
        started_loads = []
        for expert in experts:
            if self._start_load(expert, pinned, self.has_low_precision and expert in low):
                started_loads.append(expert)
            elif not late:  # more experts at once than slots: the caller's bug
                raise RuntimeError(f"all {self.num_slots} slots hold experts the current pass needs; "
                                   f"cannot admit expert {expert}")
            else:
                failures.append((expert, RuntimeError(f"{late} slots are held by loads still running")))
        self._own_loads_queued()
        started = time.perf_counter()
        for expert in started_loads:
            slot, job = self._pending[expert]
            if not self._wait(job, started):
                # the thread still writes this slot: it stays pending, reserved until it is done
                failures.append((expert, TimeoutError(f"the load took longer than {self.load_timeout_s:g} s")))
                continue
            del self._pending[expert]
            try:
                num_bytes, read_s = job.result()
            except Exception as exc:  # noqa: BLE001 - returned to the caller, slot released
                failures.append((expert, exc))
                self.slot_map.drop(expert)
                self._low.discard(expert)
                continue
            self._expert_to_slot[expert] = slot
            self._account(num_bytes, read_s)
        self.stats.stall_s += time.perf_counter() - started
        self._device_table = None
        return failures

    def _load(self, expert: int, slot: int, low: bool = False) -> Loaded:
        """Runs on an I/O thread: fetch one expert (its low-precision copy when ``low``) into its slot.

        Returns the bytes read and the seconds the read took (the stats count both once the load is taken)."""
        started = time.perf_counter()
        # host slots: the source writes the slot itself (no fresh tensor, no copy); a slot being
        # loaded is never read by a kernel until this load's result is taken
        into = None if self.w13_slots.is_cuda else tuple(pool[slot] for pool in self.pools)
        got = self.source.fetch(expert, low_precision=True, into=into) if low else self.source.fetch(expert, into=into)
        self.link.pace(got.bytes_read, started)
        took_s = time.perf_counter() - started
        self.load_s_ema = took_s if self.load_s_ema is None else 0.9 * self.load_s_ema + 0.1 * took_s
        if self.w13_slots.is_cuda:
            # CudaTransferEngine: on its copy stream via pinned staging, no host sync; the compute
            # stream waits on the copy's event when ensure() takes this load's result
            self.engine.copy_in(tuple(pool[slot] for pool in self.pools), got.tensors)
        return Loaded(got.bytes_read, took_s)

    def remap(self, topk_ids: torch.Tensor) -> torch.Tensor:
        """Router expert ids [T, k] -> slot ids [T, k], same dtype and device."""
        if topk_ids.dtype not in (torch.int32, torch.int64):  # not an index dtype: through int64
            return self.remap(topk_ids.long()).to(topk_ids.dtype)
        table = self._device_table
        if table is None or table.dtype != topk_ids.dtype or table.device != topk_ids.device:
            # in the ids' dtype and device: one indexing op per call, no conversions (a decode step's MoE call
            # runs this once per layer)
            table = self._device_table = torch.tensor(self._expert_to_slot, dtype=topk_ids.dtype,
                                                      device=topk_ids.device)
        return table[topk_ids]

    def _demand_load_over(self, job: Future) -> None:
        """Runs where ``job`` (a demand load) ends, on its I/O thread: the time the step's loads were over."""
        self._demand_done_s = time.perf_counter()

    def end_resident_step(self) -> None:
        """A step of a layer whose experts all stay resident (:attr:`identity`) is over: it loaded nothing."""
        self.stats.steps += 1
        self.ended_s = time.perf_counter()
        self.own_loads_done_s = self._began_s

    def end_step(self) -> None:
        """Release what the policy does not keep across steps (Load-on-Demand)."""
        self._own_loads_queued()  # a step that loaded nothing of its own (or failed first)
        self.own_loads_done_s = self._began_s if self._demand_done_s is None else self._demand_done_s
        if self._step_marks is not None:
            kind, stall_s, misses = self._step_marks
            self.prefetch_gate.record_stall(kind, self.stats.stall_s - stall_s, self.stats.misses - misses)
            self._step_marks = None
        self.stats.steps += 1
        self.last_step_needs, self._step_needs = self._step_needs, None
        self.ended_s = time.perf_counter()
        self._release_prefetches()
        # loads still running (a guess the step did not need) land later: no wait here, and
        # nothing in flight is dropped under its load (``keep``)
        self._collect_finished()
        self._demand.clear()  # loaded for tokens that failed: from now on plain residents
        for expert in self.slot_map.end_step(keep=self._pending):
            self._forget(expert)

    def stats_dict(self) -> dict:
        """The layer's counters, with the slots in use now."""
        self.stats.resident = len(self.slot_map)
        return self.stats.to_dict()
