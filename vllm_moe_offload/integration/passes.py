"""The pass schedule of an offloaded MoE layer: which rows compute when, and which loads start meanwhile.

A step that needs more distinct experts than the layer has slots runs in passes
split by tokens (each token's experts in one pass, one kernel call per token, so
results are bit-identical to stock); ``OffloadRoutedExperts._offloaded_forward``
plans them (``core.cache.pack_passes``) and runs each with :meth:`PassSchedule._run_pass`.
Within a pass, rows whose experts are resident compute while the others' experts
load, in waves as they land (:meth:`PassSchedule._run_waves`); a pass that holds
every slot frees some early for the next pass's loads
(:meth:`PassSchedule._free_for_next_pass`).

:class:`PassSchedule` is a mixin of ``OffloadRoutedExperts``; it needs the layer's
``slots`` (``runtime.slots.LayerSlots``), ``_kernel(x, topk_weights, slot_ids)``,
``expert_format`` (None when unquantized), ``call_s_min`` and ``ready_first``.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter
from collections.abc import Collection, Sequence

import torch

from vllm_moe_offload.integration.kernel_blocks import stock_paths_call
from vllm_moe_offload.runtime.slots import ExpertLoadError


#: up to this many routed ids, distinct experts are found in Python (a decode step's or a wave's handful:
#: about 1.5 us against torch.unique's 5)
_SMALL_ROUTING = 64


def row_experts(topk_ids: torch.Tensor) -> list[tuple[int, ...]]:
    """Each row of ``topk_ids [T, k]`` as a tuple of expert ids, through one flat list.

    Torch's nested ``tolist`` builds a list per row, which the garbage collector tracks: for a 4096-row step
    in a process holding 2 million lists, 300 calls took 3.8 ms on average with pauses up to 366 ms (median
    0.16), this 0.25 ms (at most 0.6; median 0.22)."""
    k = topk_ids.shape[1]
    flat = topk_ids.reshape(-1).tolist()
    return list(zip(*(flat[j::k] for j in range(k))))


def distinct_experts(topk_ids: torch.Tensor) -> list[int]:
    """The distinct expert ids of ``topk_ids [T, k]``, ascending (as ``torch.unique``)."""
    if topk_ids.numel() <= _SMALL_ROUTING:
        return sorted(set(topk_ids.flatten().tolist()))
    return torch.unique(topk_ids).tolist()


class PassSchedule:
    """How a layer runs one pass of a step: waves as loads land, slots freed early for the next pass."""

    def _run_pass(
        self, idx, x, topk_weights, topk_ids, out, failed: dict[int, str], low: set[int],
        then: list[list[int]] = (),
    ) -> None:
        """Compute the rows ``idx`` into ``out``, except those that need an expert in ``failed``.

        Experts whose load fails on the way join ``failed``; the pass then goes
        on with the rows that do not need them. ``then``: the experts of each row
        of the step's next pass (see :meth:`_run_waves`).
        """
        slots = self.slots
        counted: set[int] = set()  # experts whose need this pass has counted (hits and misses once a pass)
        while idx.numel():
            if failed:
                gone = torch.tensor(sorted(failed), device=topk_ids.device)
                idx = idx[~torch.isin(topk_ids[idx], gone).any(dim=-1)]
                if not idx.numel():
                    return
            try:
                if self.ready_first:
                    idx = self._run_waves(idx, x, topk_weights, topk_ids, out, low, counted, then)
                    if not idx.numel():
                        return
                ids = topk_ids[idx]  # [t, k]
                slots.ensure(distinct_experts(ids), low=low, counted=counted)
            except ExpertLoadError as err:
                failed.update(dict.fromkeys(err.experts, str(err)))
                continue
            if self.expert_format is not None and idx.numel() < topk_ids.shape[0]:
                idx = idx.sort().values  # the step's token order: a row's kernel path depends on it
                out[idx] = self._part_of_step(idx, x, topk_weights, topk_ids)
            else:
                out[idx] = self._kernel(x[idx], topk_weights[idx], slots.remap(ids))
            return

    def _part_of_step(self, idx, x, topk_weights, topk_ids) -> torch.Tensor:
        """A quantized layer's kernel call for some of the step's rows ``idx``, padded so that each row takes
        the kernel path it takes in the whole step's call (``integration/kernel_blocks.py``): its bits are
        stock's. ``idx``: ascending."""
        args = stock_paths_call(
            idx, x[idx], topk_weights[idx], self.slots.remap(topk_ids[idx]), topk_ids, self.slots.num_slots,
        )
        return self._kernel(*args[:3])[args[3]:]

    def _run_waves(
        self, idx, x, topk_weights, topk_ids, out, low: set[int], counted: set[int], then: list[list[int]] = (),
    ) -> torch.Tensor:
        """Compute the rows ``idx`` in waves as their experts land; returns the rows left to compute.

        Starts the pass's missing loads in the order that completes rows soonest
        (:func:`load_order`), computes the rows whose experts are all resident,
        then waits for one load at a time and computes the rows it completes (a
        wave) while the later loads run (:meth:`_wave_pays` decides when a wave
        is worth its kernel call). Tokens stay whole, one kernel call each, so
        results are exact. Rows left: those needing an expert whose load could
        not start, failed (it is retried) or is late; the caller's ensure loads
        or reports them.

        ``then`` (the step's next pass's rows, when the step runs in several
        passes): before each kernel call, the next pass's missing loads start in
        the slots of experts no row left here needs, so the I/O thread works
        while this pass computes instead of waiting for the next pass to begin.
        """
        slots = self.slots
        if idx.numel() < 2:
            return idx
        ids = topk_ids[idx]  # [t, k]
        rows = row_experts(ids)
        experts = sorted({e for row in rows for e in row})
        missing = slots.missing(experts)
        if not missing:
            return self._free_for_next_pass(idx, ids, x, topk_weights, topk_ids, out, low, counted, then)
        waves = _Waves(rows, missing, device=idx.device)
        order = load_order(waves.needs(), missing, ahead=slots.in_flight(missing), counts=waves.sizes())
        slots.start_loads(order, experts, low=low)
        while True:
            waves.landed(slots.missing(waves.absent))
            waiting = slots.in_flight(waves.absent)
            if not waiting and waves.all_ready():  # the pass's last rows: free slots for the next first
                left = waves.take_ready()
                return self._free_for_next_pass(idx[left], ids[left], x, topk_weights, topk_ids, out, low, counted,
                                                then)
            if waves.ready and (not waiting or self._wave_pays(len(waiting))):
                if then:
                    self._start_next_pass(then, waves.needed(), low)
                ready_experts = waves.ready_experts()
                wave = waves.take_ready()
                self._compute_rows(idx[wave], ids[wave], x, topk_weights, topk_ids, out, low, counted, ready_experts)
                if waiting:
                    slots.stats.waves += 1
                if waves.done():
                    return idx[:0]
            if not waiting or not slots.wait_next(waiting):
                return idx[waves.left()]  # nothing in flight for them, or a late load: ensure reports it

    def _compute_rows(
        self, wave, wave_ids, x, topk_weights, topk_ids, out, low: set[int], counted: set[int],
        experts: list[int] | None = None,
    ) -> None:
        """One kernel call for the rows ``wave`` (their experts ``wave_ids [w, k]``, all resident, or
        ``experts`` where the caller has them) into ``out``."""
        slots = self.slots
        if experts is None:
            experts = distinct_experts(wave_ids)
        slots.ensure(experts, low=low, counted=counted)  # resident: no wait
        if self.expert_format is not None:
            wave = wave.sort().values  # the step's token order: a row's kernel path depends on it
            out[wave] = self._part_of_step(wave, x, topk_weights, topk_ids)
        else:
            out[wave] = self._kernel(x[wave], topk_weights[wave], slots.remap(wave_ids))

    def _free_for_next_pass(
        self, idx, ids, x, topk_weights, topk_ids, out, low: set[int], counted: set[int], then: list[list[int]],
    ) -> torch.Tensor:
        """A pass whose experts are all resident: free slots for the next pass's loads before computing it all.

        When this pass holds every slot the next pass's loads could take, they
        could only start once the pass is done, and the link would idle for
        the pass's whole compute. Instead, one at a time, an expert the next
        pass does not need ("leaving", the one with the fewest rows first)
        computes its rows in a kernel call of their own; its slot is then
        free and the next pass's next load starts (:meth:`_start_next_pass`)
        while the rest of this pass computes. As many experts leave early as
        the next pass has loads that find no slot, each only while a load
        outlasts one more kernel call (:meth:`_wave_pays`). Tokens stay whole,
        so results are exact. Returns the rows left, for the caller's one call.
        """
        slots = self.slots
        rows = row_experts(ids)
        self._start_next_pass(then, {e for row in rows for e in row}, low)  # into slots this pass leaves alone
        if not then:
            return idx
        upcoming = {e for row in then for e in row}
        todo = torch.ones(len(rows), dtype=torch.bool, device=ids.device)  # [t] rows not computed yet
        while True:
            flying = set(slots.in_flight(upcoming))
            waiting = [e for e in slots.missing(upcoming) if e not in flying]  # no slot yet
            left = ids[todo]  # [r, k]
            leaving = set(distinct_experts(left)) - upcoming
            if not waiting or not leaving or not self._wave_pays(1):
                return idx[todo]
            counts = {e: int((left == e).any(dim=-1).sum()) for e in leaving}
            expert = min(leaving, key=lambda e: (counts[e], e))
            wave = todo & (ids == expert).any(dim=-1)
            if bool(wave.eq(todo).all()):  # every row left needs it: nothing would compute while loading
                return idx[todo]
            self._compute_rows(idx[wave], ids[wave], x, topk_weights, topk_ids, out, low, counted)
            slots.stats.waves += 1
            todo &= ~wave
            self._start_next_pass(then, set(distinct_experts(ids[todo])), low)

    def _start_next_pass(self, then: list[list[int]], needed: Collection[int], low: set[int]) -> None:
        """Start the loads of the next pass's rows ``then`` in slots whose experts no row in ``needed`` needs.

        Pinned: ``needed`` (this pass's rows still to compute) and the next pass's
        experts; the loads stop at the first one with no such slot. They count as
        misses of the next pass, which waits for them like for its own.
        """
        if not then:
            return
        slots = self.slots
        experts = {e for row in then for e in row}
        missing = slots.missing(experts)
        if missing:
            order = load_order(then, missing, ahead=slots.in_flight(missing))
            slots.start_loads(order, set(needed) | experts, low=low)

    def _wave_pays(self, in_flight: int) -> bool:
        """Whether rows ready now should compute now, with ``in_flight`` loads their pass still waits for.

        A wave run now overlaps its kernel with those loads; held back, it joins
        a later kernel call. Run now, it hides up to the loads' remaining time
        and costs one more call's fixed part (the fastest call seen: a few rows,
        their experts' weights read once more), so it pays while
        ``in_flight x load time >= fastest call``. Until both are measured, it
        runs. On the padded tiny Mixtral (CPU) a load takes ~3.3 ms and a small
        call well under a millisecond, so every wave with a load in flight runs;
        gating on the smoothed call time instead (big prefill passes included)
        held back 425 of 1538 waves and stalled longer (4.2-4.8 s against 3.9 s
        in the batch bench at 25%).
        """
        load_s = self.slots.load_s_ema
        if load_s is None or self.call_s_min is None:
            return True
        return in_flight * load_s >= self.call_s_min


class _Waves:
    """A pass's rows waiting for their experts' loads, grouped by the experts they need.

    Each landing counts down only the groups that wait for it, and a wave's rows are gathered once, where the
    loop tested every row of the pass against the absent experts at each landing (a dozen tensor operations).
    A 512-token prefill of tiny-mixtral has about a hundred groups. Measured in vLLM's multiprocess engine on
    ``tm-x16`` (lru, 3 engines x 3 prefills each way, alternating): the MoE op's own time besides its kernel
    calls and waits, 27.4 -> 25.3 ms per 512-token prefill at 25% (about 60 waves), 18.1 -> 17.5 at 50%; the
    wall time level within the noise (``docs/bench/multiprocess-breakdown/``).
    """

    def __init__(self, rows: list[tuple[int, ...]], missing: Collection[int], device=None) -> None:
        self._device = device
        missing = set(missing)
        groups: dict[frozenset[int], list[int]] = {}
        for position, row in enumerate(rows):
            groups.setdefault(frozenset(row), []).append(position)
        self._groups = list(groups.items())  # (experts, row positions)
        self._count = [0] * len(self._groups)  # per group: its experts not landed yet
        self._by_expert: dict[int, list[int]] = {e: [] for e in missing}  # expert -> groups waiting for it
        self.ready: list[int] = []  # groups whose experts are all resident, not computed yet
        self._pending = set(range(len(self._groups)))  # groups not computed yet
        for g, (need, _) in enumerate(self._groups):
            for e in need & missing:
                self._by_expert[e].append(g)
                self._count[g] += 1
            if not self._count[g]:
                self.ready.append(g)
        #: the pass's experts not landed yet (as far as :meth:`landed` was told)
        self.absent: list[int] = sorted(missing)

    def landed(self, absent: list[int]) -> None:
        """The experts still absent now: those that left the list landed, and their groups count down."""
        if len(absent) == len(self.absent):
            return
        still = set(absent)
        for e in self.absent:
            if e not in still:
                for g in self._by_expert[e]:
                    self._count[g] -= 1
                    if not self._count[g]:
                        self.ready.append(g)
        self.absent = absent

    def needs(self) -> list[frozenset[int]]:
        """Each group's experts (a row of :func:`load_order`, counted :meth:`sizes` times)."""
        return [need for need, _ in self._groups]

    def sizes(self) -> list[int]:
        return [len(positions) for _, positions in self._groups]

    def all_ready(self) -> bool:
        return len(self.ready) == len(self._pending)

    def ready_experts(self) -> list[int]:
        return sorted(set().union(*(self._groups[g][0] for g in self.ready)))

    def needed(self) -> set[int]:
        """The experts of every row not computed yet."""
        return set().union(*(self._groups[g][0] for g in self._pending))

    def take_ready(self) -> torch.Tensor:
        """The ready rows' positions, ascending (as a mask selects them); they count as computed."""
        taken, self.ready = self.ready, []
        self._pending.difference_update(taken)
        return self._positions(taken)

    def done(self) -> bool:
        return not self._pending

    def left(self) -> torch.Tensor:
        """The positions of the rows not computed, ascending."""
        return self._positions(self._pending)

    def _positions(self, groups) -> torch.Tensor:
        positions = sorted(p for g in groups for p in self._groups[g][1])
        return torch.tensor(positions, dtype=torch.long, device=self._device)


#: above this many (distinct row need, candidate) pairs, :func:`load_order` orders by need only (a prefill
#: of a 64-expert model: building the greedy's bookkeeping would cost more than its order saves)
_GREEDY_MAX_PAIRS = 20_000


def load_order(
    rows: Sequence[Collection[int]], missing: Collection[int], ahead: Collection[int] = (),
    counts: Sequence[int] | None = None,
) -> list[int]:
    """The order to load ``missing`` experts in so that rows complete soonest.

    ``rows``: each token's experts (or each distinct row once, with ``counts``
    giving how many tokens have it); ``ahead``: those of ``missing`` already in
    flight (they land before anything started now, and are not returned).
    Greedy: next the expert that completes the most rows given those before
    it; ties: the one most rows still wait for, then the lowest id.

    Incremental: a pick only shrinks the needs that hold it, so each distinct
    need is visited once per expert it holds; rows that wait for an expert
    do not change as others are picked (the "waiting" tie-break is fixed).
    Candidates sit in a heap whose stale entries are skipped (an expert's
    count of rows it completes only grows). In a 32-row batch-1 step of the
    padded tiny Mixtral this took about 230 us a call when it recounted every
    need at every pick.
    """
    wanted = set(missing)
    covered = set(ahead)
    needs: Counter[frozenset[int]] = Counter()  # missing set -> rows
    for row, num in zip(rows, counts if counts is not None else itertools.repeat(1)):
        needs[frozenset(e for e in row if e in wanted)] += num
    needs.pop(frozenset(), None)
    if len(needs) * len(wanted - covered) > _GREEDY_MAX_PAIRS:
        rows_of: Counter[int] = Counter()  # rows waiting for an expert
        for need, num in needs.items():
            for expert in need:
                rows_of[expert] += num
        return sorted(wanted - covered, key=lambda e: (-rows_of[e], e))
    completes: Counter[int] = Counter()  # rows an expert would complete now
    waiting: Counter[int] = Counter()  # rows waiting for an expert
    holding: dict[int, list[tuple[set[int], int]]] = {}  # expert -> the (shrinking) rests of its needs, rows
    for need, num in needs.items():
        rest = set(need - covered)
        for expert in rest:
            waiting[expert] += num
            holding.setdefault(expert, []).append((rest, num))
        if len(rest) == 1:
            completes[next(iter(rest))] += num
    heap = [(-completes[e], -waiting[e], e) for e in wanted - covered]
    heapq.heapify(heap)
    order = []
    while heap:
        done, _, expert = heapq.heappop(heap)
        if expert in covered or -done != completes[expert]:
            continue  # picked already, or a stale entry (a fresher one is in the heap)
        order.append(expert)
        covered.add(expert)
        for rest, num in holding.get(expert, ()):
            rest.discard(expert)
            if len(rest) == 1:
                other = next(iter(rest))
                completes[other] += num
                heapq.heappush(heap, (-completes[other], -waiting[other], other))
    return order
