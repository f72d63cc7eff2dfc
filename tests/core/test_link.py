"""The link schedule (core/link.py): queue order, stale loads, admission, the eviction guard, the prefill's first pass."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_moe_offload.core.cache import pack_passes
from vllm_moe_offload.core.link import (
    DEMAND,
    LayerClock,
    LinkRate,
    LoadPriority,
    LoadQueue,
    admit_prefetches,
    first_pass,
    outranking,
)

MIB = 2**20

priorities = st.one_of(
    st.just(DEMAND),
    st.builds(
        LoadPriority, demand=st.just(False), needed_at=st.integers(0, 20),
        confidence=st.floats(0, 1), num_bytes=st.integers(0, 4 * MIB),
    ),
)


@settings(max_examples=200, deadline=None)
@given(pushed=st.lists(st.tuples(priorities, st.booleans()), max_size=30))
def test_queue_pops_demand_first_then_nearest_then_most_confident_and_skips_the_cancelled(pushed):
    cancelled = {i for i, (_, gone) in enumerate(pushed) if gone}
    queue: LoadQueue[int] = LoadQueue(lambda item: item in cancelled)
    for i, (priority, _) in enumerate(pushed):
        queue.push(i, priority)
    assert len(queue) == len(pushed) - len(cancelled)
    assert queue.queued_prefetch_bytes() == sum(
        p.num_bytes for i, (p, _) in enumerate(pushed) if not p.demand and i not in cancelled
    )
    popped = []
    while (got := queue.pop()) is not None:
        popped.append(got)
    assert sorted(i for _, i in popped) == sorted(set(range(len(pushed))) - cancelled)
    keys = [(0 if p.demand else 1, 0 if p.demand else p.needed_at, -p.confidence) for p, _ in popped]
    assert keys == sorted(keys)
    # equal keys keep their order of arrival (demand loads: first come first served)
    for (pa, a), (pb, b) in zip(popped, popped[1:]):
        if pa.key() == pb.key():
            assert a < b


def test_queue_holds_prefetches_but_not_demand_loads():
    queue: LoadQueue[str] = LoadQueue()
    queue.push("guess", LoadPriority(demand=False, needed_at=3, confidence=0.9))
    assert queue.pop(demand_only=True) is None  # held: the guess stays queued
    queue.push("miss")
    assert queue.pop(demand_only=True) == (DEMAND, "miss")
    assert queue.pop(demand_only=True) is None
    assert queue.pop()[1] == "guess"
    assert queue.pop() is None


def _rate(ms_per_mib: float) -> LinkRate:
    rate = LinkRate()
    rate.add(MIB, ms_per_mib / 1e3)
    return rate


def test_admission_fills_the_idle_link_before_the_layer_runs():
    rate = _rate(1.0)  # 1 ms per MiB: a 2 MiB expert takes 2 ms
    experts = [5, 3, 9, 1]
    # nothing queued, 5 ms of compute before the next layer: loads start at 0, 2 and 4 ms, the 4th would start at 6
    assert admit_prefetches(experts, 2 * MIB, 1, 0, rate, 5e-3) == 3
    # two layers ahead: twice the window
    assert admit_prefetches(experts, 2 * MIB, 2, 0, rate, 5e-3) == 4
    # 4 MiB of prefetches already queued or running: the link is busy 4 ms of the 5
    assert admit_prefetches(experts, 2 * MIB, 1, 4 * MIB, rate, 5e-3) == 1
    # busy past the window: the link would not idle; nothing is admitted
    assert admit_prefetches(experts, 2 * MIB, 1, 6 * MIB, rate, 5e-3) == 0
    assert admit_prefetches(experts, 2 * MIB, 1, 6 * MIB, rate, 5e-3, minimum=1) == 1
    # two lanes carry twice as much in the same compute
    assert admit_prefetches(experts, 2 * MIB, 1, 0, rate, 2.5e-3, lanes=2) == 3


def test_admission_takes_everything_until_the_link_and_the_compute_are_measured():
    assert admit_prefetches([1, 2, 3], MIB, 1, 10 * MIB, LinkRate(), 1e-3) == 3
    assert admit_prefetches([1, 2, 3], MIB, 1, 10 * MIB, _rate(1.0), None) == 3
    assert admit_prefetches([], MIB, 1, 0, _rate(1.0), 1.0) == 0


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(0, 16), size=st.integers(1, 8 * MIB), distance=st.integers(1, 4),
    backlog=st.integers(0, 64 * MIB), ms_per_mib=st.floats(0.01, 10), compute_ms=st.floats(0, 50),
)
def test_admitted_prefetches_all_start_while_the_link_would_idle(n, size, distance, backlog, ms_per_mib, compute_ms):
    rate = _rate(ms_per_mib)
    admitted = admit_prefetches(list(range(n)), size, distance, backlog, rate, compute_ms / 1e3)
    assert 0 <= admitted <= n
    window_s = distance * compute_ms / 1e3
    start_s = lambda i: rate.seconds(backlog + i * size)  # noqa: E731 - when the i-th admitted load starts
    assert all(start_s(i) < window_s for i in range(admitted))
    if admitted < n:  # the next one would not have started before the layer runs
        assert start_s(admitted) >= window_s


def test_outranking_spares_residents_scored_at_least_as_high():
    scores = [0.1, 0.5, 0.3, 0.05]
    assert outranking(0.3, [0, 1, 2, 3], scores) == {1, 2}
    assert outranking(0.3, [0, 3], scores) == set()
    assert outranking(0.3, [1, 7], {1: 0.9}) == {1}  # unscored experts never outrank


def test_layer_clock_measures_compute_without_stalls_and_idle_gaps():
    clock = LayerClock()
    assert clock.tick(0.0) == 1 and clock.compute_s is None
    clock.tick(0.010, stall_s=0.004)
    assert abs(clock.compute_s - 0.006) < 1e-12
    clock.tick(5.0)  # the engine was idle between requests: not compute
    assert abs(clock.compute_s - 0.006) < 1e-12
    clock.tick(5.002)
    assert 0.002 < clock.compute_s < 0.006 and clock.layers == 4


def test_first_pass_is_the_pass_with_the_fewest_loads():
    rows = [[0, 1], [0, 1], [2, 3], [4, 5], [4, 6]]
    # 3 slots: tokens grouped by expert set, the set with most tokens first, a pass closed when no set fits
    passes = pack_passes(rows, 3)
    assert [sorted({e for i in p for e in rows[i]}) for p in passes] == [[0, 1], [2, 3], [4, 5, 6]]
    assert first_pass(rows, 3) == [0, 1]  # nothing resident: the first of the equally cheap passes
    assert first_pass(rows, 3, resident={4, 6}) == [4, 5, 6]  # one load instead of two
    assert first_pass(rows, 16) == [0, 1, 4, 2, 3, 5, 6]  # everything fits: all, most needed first
    assert first_pass([], 3) == []


@settings(max_examples=200, deadline=None)
@given(
    rows=st.lists(st.lists(st.integers(0, 7), min_size=2, max_size=2, unique=True), max_size=40),
    num_slots=st.integers(2, 8), resident=st.sets(st.integers(0, 7), max_size=8),
)
def test_first_pass_is_one_of_the_layers_passes(rows, num_slots, resident):
    experts = first_pass(rows, num_slots, resident)
    assert len(experts) <= num_slots and len(set(experts)) == len(experts)
    if not rows:
        assert experts == []
        return
    # the layer's first pass, planned from the same residents: it holds a token needing the fewest loads
    passes = pack_passes(rows, num_slots, resident)
    assert set(experts) == {e for i in passes[0] for e in rows[i]}
    assert min(len(set(rows[i]) - resident) for i in passes[0]) == min(len(set(r) - resident) for r in rows)
