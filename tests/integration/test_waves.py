"""Waves: a pass's rows compute as their experts' loads land, one load waited for at a time.

The layer's own pass logic (``integration/passes.py``: ``PassSchedule._run_pass``
and the methods it calls) runs on a real slot pool over a real checkpoint and a real one-thread
transfer engine; the source holds chosen experts' loads on an Event, so the
test decides when each load lands. The MoE kernel is a plain torch SwiGLU over
the slot weights that logs which rows each call computed (the real kernel and
bit-exact tokens are covered by test_equality's engine runs).
"""

import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.runtime.test_slots import E, H, I, PREFIX, _identity, experts  # noqa: F401 (fixture)
from tests.runtime.test_slots_cancel import RELEASE_WAIT_S, GatedSource, _wait_running
from vllm_moe_offload.core.cache import SlotMap
from vllm_moe_offload.core.replacement import make_policy
from vllm_moe_offload.integration.passes import PassSchedule, _Waves, load_order
from vllm_moe_offload.runtime.safetensors_io import CheckpointIndex, ThreadLocalReaders
from vllm_moe_offload.runtime.slots import LayerSlots
from vllm_moe_offload.runtime.expert_layout import per_expert_layout
from vllm_moe_offload.runtime.tiers import DiskSource
from vllm_moe_offload.runtime.transfer import LinkEmulator, ThreadTransferEngine

#: rows (tokens) and their top-2 experts; 0 and 1 are resident when the pass starts
ROWS = [[0, 1], [0, 2], [2, 1], [3, 4], [4, 0]]


class FailingSource(GatedSource):
    """A gated source whose loads of ``broken`` experts raise, as a short read does."""

    def __init__(self, inner, gated, broken):
        super().__init__(inner, gated)
        self.broken = set(broken)

    def fetch(self, expert_idx, into=None):
        if expert_idx in self.broken:
            self.started.append(expert_idx)
            raise OSError(f"short read of expert {expert_idx}")
        return super().fetch(expert_idx, into=into)


class Layer(PassSchedule):
    """The pass schedule of ``OffloadRoutedExperts`` on a slot pool, with a reference kernel."""

    expert_format = None  # unquantized: calls are not padded (integration/kernel_blocks.py)

    def __init__(self, slots: LayerSlots) -> None:
        self.slots = slots
        self.call_s_min: float | None = None
        self.ready_first = True
        self.calls: list[list[int]] = []  # rows each kernel call computed
        self.called = threading.Semaphore(0)

    def _kernel(self, x, topk_weights, slot_ids):
        """x [t, H] (column 0: the row's index), topk_weights [t, k], slot_ids [t, k] -> [t, H]."""
        out = torch.zeros_like(x)
        for row in range(x.shape[0]):
            for weight, slot in zip(topk_weights[row], slot_ids[row].tolist()):
                assert slot >= 0, "the kernel read an expert that is not resident"
                out[row] += weight * _expert(self.slots.w13_slots[slot], self.slots.w2_slots[slot], x[row])
        self.calls.append(x[:, 0].long().tolist())
        self.called.release()
        return out


def _expert(w13, w2, x):
    """w13 [2I, H], w2 [H, I], x [H] -> [H]: one SwiGLU expert."""
    gate_up = w13 @ x  # [2I]
    return w2 @ (torch.nn.functional.silu(gate_up[:I]) * gate_up[I:])


def _layer(folder, gated=(), broken=()):
    readers = ThreadLocalReaders(direct_io=True)
    disk = DiskSource(CheckpointIndex(folder), per_expert_layout(PREFIX, "w1", "w3", "w2"), _identity, readers)
    source = FailingSource(disk, set(gated), broken)
    slot_map = SlotMap(E, 5, make_policy("lru", E, 5, top_k=2))
    slots = LayerSlots(0, torch.zeros(5, 2 * I, H), torch.zeros(5, H, I), slot_map, source,
                       ThreadTransferEngine(1), LinkEmulator())
    slots.ensure([0, 1])  # resident before the pass
    slots.end_step()
    source.started.clear()
    return Layer(slots), source


def _inputs():
    torch.manual_seed(1)
    x = torch.randn(len(ROWS), H)
    x[:, 0] = torch.arange(len(ROWS))  # each row carries its index, for the call log
    return x, torch.rand(len(ROWS), 2), torch.tensor(ROWS, dtype=torch.int32)


def _reference(tensors, x, topk_weights):
    out = torch.zeros_like(x)
    for row, experts in enumerate(ROWS):
        for weight, e in zip(topk_weights[row], experts):
            w13 = torch.cat([tensors[f"{PREFIX}.{e}.w1.weight"], tensors[f"{PREFIX}.{e}.w3.weight"]])
            out[row] += weight * _expert(w13, tensors[f"{PREFIX}.{e}.w2.weight"], x[row])
    return out


def _run(layer, x, topk_weights, topk_ids, failed, then=()):
    out = torch.full_like(x, float("nan"))
    thread = threading.Thread(
        target=layer._run_pass, args=(torch.arange(len(ROWS)), x, topk_weights, topk_ids, out, failed, set(), then),
    )
    thread.start()
    return out, thread


def _next_call(layer):
    assert layer.called.acquire(timeout=RELEASE_WAIT_S), "no kernel call came"
    return layer.calls[-1]


def test_load_order_completes_rows_soonest():
    # 2 completes two rows; then 4 completes [4, 0]; 3 last. In flight already: not reordered, not returned.
    assert load_order(ROWS, [2, 3, 4]) == [2, 4, 3]
    assert load_order(ROWS, [2, 3, 4], ahead=[3]) == [2, 4]  # 3 lands first: 4 now completes two rows too; ties: 2
    assert load_order([[5, 6], [5, 7], [6, 7]], [5, 6, 7]) == [5, 6, 7]  # ties: most rows waiting, then id


def _greedy_as_stated(rows, missing, ahead):
    """load_order's rule, recounted from scratch at every pick."""
    covered, left, order = set(ahead), sorted(set(missing) - set(ahead)), []
    while left:
        rests = [{e for e in row if e in set(missing)} - covered for row in rows]
        completes = {e: sum(rest == {e} for rest in rests) for e in left}
        waiting = {e: sum(e in rest for rest in rests) for e in left}
        best = min(left, key=lambda e: (-completes[e], -waiting[e], e))
        order.append(best)
        covered.add(best)
        left.remove(best)
    return order


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_load_order_is_the_greedy_as_stated(data):
    num_experts = data.draw(st.integers(1, 10))
    top_k = data.draw(st.integers(1, min(3, num_experts)))
    token = st.lists(st.integers(0, num_experts - 1), min_size=top_k, max_size=top_k, unique=True)
    rows = data.draw(st.lists(token, max_size=40))
    missing = data.draw(st.lists(st.integers(0, num_experts - 1), unique=True))
    ahead = data.draw(st.lists(st.sampled_from(missing), unique=True)) if missing else []
    assert load_order(rows, missing, ahead) == _greedy_as_stated(rows, missing, ahead)


def test_rows_compute_in_waves_as_each_load_lands(experts):  # noqa: F811
    folder, tensors = experts
    layer, source = _layer(folder, gated={2, 3, 4})
    x, topk_weights, topk_ids = _inputs()
    out, thread = _run(layer, x, topk_weights, topk_ids, failed := {})
    assert _next_call(layer) == [0]  # resident experts only, while the loads run
    _wait_running(source, 2)
    assert source.started == [2]  # one I/O thread: 4 and 3 queue behind 2, in that order
    source.release(2)
    assert _next_call(layer) == [1, 2]  # 2 landed: the rows it completes, while 4 still loads
    _wait_running(source, 4)
    assert not source.running[3].is_set()
    source.release(4)
    assert _next_call(layer) == [4]
    source.release(3)
    assert _next_call(layer) == [3]
    thread.join(RELEASE_WAIT_S)
    assert not thread.is_alive() and not failed
    assert source.started == [2, 4, 3]
    torch.testing.assert_close(out, _reference(tensors, x, topk_weights))
    stats = layer.slots.stats
    assert stats.waves == 3  # the last call had no load left to hide behind
    # one need per expert and pass: 0 and 1 hit once each although three calls used them
    assert (stats.hits, stats.misses, stats.loads) == (2, 2 + 3, 2 + 3)
    assert stats.stall_s > 0
    layer.slots.engine.shutdown()


def test_the_next_pass_loads_into_slots_this_pass_is_done_with(experts):  # noqa: F811
    folder, tensors = experts
    layer, source = _layer(folder, gated={2, 3, 4})
    x, topk_weights, topk_ids = _inputs()
    out, thread = _run(layer, x, topk_weights, topk_ids, failed := {}, then=[[5, 2]])
    assert _next_call(layer) == [0]
    source.release(2)
    assert _next_call(layer) == [1, 2]
    slots = layer.slots
    assert slots.in_flight([5]) == []  # all 5 slots held by experts rows still need, or loads
    source.release(4)
    assert _next_call(layer) == [4]
    # rows left need 3, 4 and 0: the next pass's 5 took the slot of 1 before this call, and queues behind 3
    assert slots.in_flight([5]) == [5] and slots.slot_map.slot_of(1) is None
    assert not source.running[5].is_set()
    source.release(3)
    assert _next_call(layer) == [3]
    thread.join(RELEASE_WAIT_S)
    torch.testing.assert_close(out, _reference(tensors, x, topk_weights))
    slots.ensure([5, 2])  # the next pass: 5 is a miss that was loaded while this pass computed
    assert source.started == [2, 4, 3, 5] and slots.stats.misses == 2 + 3 + 1
    slots.engine.shutdown()


def _all_resident_layer(folder):
    """Every expert of ROWS resident (all 5 slots), the next pass's 5 gated."""
    layer, source = _layer(folder, gated={5})
    layer.slots.ensure([2, 3, 4])
    layer.slots.end_step()
    source.started.clear()
    started_at_call = []  # the next pass's loads in flight (submitted) when each kernel call came
    kernel = layer._kernel

    def logged(*args):
        started_at_call.append(layer.slots.in_flight([5]))
        return kernel(*args)

    layer._kernel = logged
    return layer, source, started_at_call


def test_a_resident_pass_frees_a_slot_for_the_next_pass_before_its_last_call(experts):  # noqa: F811
    folder, tensors = experts
    layer, source, started_at_call = _all_resident_layer(folder)
    hits = layer.slots.stats.hits
    x, topk_weights, topk_ids = _inputs()
    out, thread = _run(layer, x, topk_weights, topk_ids, failed := {}, then=[[5, 0]])
    # every slot holds an expert of this pass; 3 is the leaving expert (not in the next pass) with the fewest
    # rows: its row computes first, then 5 loads into its slot while the rest of the pass computes
    thread.join(RELEASE_WAIT_S)
    assert not thread.is_alive() and not failed
    assert layer.calls == [[3], [0, 1, 2, 4]] and started_at_call == [[], [5]]
    torch.testing.assert_close(out, _reference(tensors, x, topk_weights))
    slots = layer.slots
    assert slots.in_flight([5]) == [5] and slots.slot_map.slot_of(3) is None
    assert slots.stats.hits - hits == 5 and slots.stats.waves == 1  # one need per expert and pass
    source.release(5)
    slots.ensure([5, 0])  # the next pass: 5 was loaded while this one computed
    slots.engine.shutdown()


def test_a_resident_pass_stays_one_call_when_a_call_costs_more_than_a_load(experts):  # noqa: F811
    folder, tensors = experts
    layer, source, started_at_call = _all_resident_layer(folder)
    layer.slots.load_s_ema, layer.call_s_min = 0.001, 1e6
    x, topk_weights, topk_ids = _inputs()
    out, thread = _run(layer, x, topk_weights, topk_ids, failed := {}, then=[[5, 0]])
    thread.join(RELEASE_WAIT_S)
    assert layer.calls == [[0, 1, 2, 3, 4]] and started_at_call == [[]]
    torch.testing.assert_close(out, _reference(tensors, x, topk_weights))
    assert layer.slots.in_flight([5]) == []  # every slot held by this pass until its one call
    layer.slots.engine.shutdown()


def test_a_wave_that_costs_more_than_the_loads_left_waits_for_them(experts):  # noqa: F811
    folder, tensors = experts
    layer, source = _layer(folder)
    layer.call_s_min = 1e6  # one more kernel call costs more than any load hides: no wave pays
    x, topk_weights, topk_ids = _inputs()
    out, thread = _run(layer, x, topk_weights, topk_ids, failed := {})
    thread.join(RELEASE_WAIT_S)
    assert layer.calls == [[0, 1, 2, 3, 4]] and layer.slots.stats.waves == 0
    torch.testing.assert_close(out, _reference(tensors, x, topk_weights))
    layer.slots.engine.shutdown()


def test_without_reordering_the_pass_is_one_call_after_every_load(experts):  # noqa: F811
    folder, tensors = experts
    layer, source = _layer(folder)
    layer.ready_first = False  # klotski's ablation without "reorder"
    x, topk_weights, topk_ids = _inputs()
    out, thread = _run(layer, x, topk_weights, topk_ids, failed := {})
    thread.join(RELEASE_WAIT_S)
    assert layer.calls == [[0, 1, 2, 3, 4]] and layer.slots.stats.waves == 0
    assert source.started == [2, 3, 4]  # plain order
    torch.testing.assert_close(out, _reference(tensors, x, topk_weights))
    layer.slots.engine.shutdown()


@pytest.mark.parametrize("broken", [4, 2])
def test_a_failed_load_fails_only_the_rows_that_need_it(experts, broken):  # noqa: F811
    folder, tensors = experts
    layer, source = _layer(folder, broken={broken})
    x, topk_weights, topk_ids = _inputs()
    out, thread = _run(layer, x, topk_weights, topk_ids, failed := {})
    thread.join(RELEASE_WAIT_S)
    assert not thread.is_alive()
    assert list(failed) == [broken] and "short read" in failed[broken]
    assert source.started.count(broken) == 2  # failed in its wave, tried again on demand, failed again
    good = [row for row, experts in enumerate(ROWS) if broken not in experts]
    bad = [row for row in range(len(ROWS)) if row not in good]
    assert sorted(r for call in layer.calls for r in call) == good  # each good row computed once
    torch.testing.assert_close(out[good], _reference(tensors, x, topk_weights)[good])
    assert out[bad].isnan().all()  # left for _fail_tokens to zero
    assert layer.slots.stats.failed_loads == 1
    layer.slots.engine.shutdown()


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_waves_give_each_row_once_when_its_last_expert_lands(data):
    """The wave bookkeeping against the plain rule: after each landing, the rows not yet taken whose experts are
    all resident, ascending; each row exactly once; the rest left."""
    rows = data.draw(st.lists(st.lists(st.integers(0, 7), min_size=2, max_size=2, unique=True).map(tuple),
                              min_size=1, max_size=40))
    experts = sorted({e for row in rows for e in row})
    missing = data.draw(st.lists(st.sampled_from(experts), unique=True))
    landings = data.draw(st.permutations(missing))
    stop = data.draw(st.integers(0, len(landings)))  # a late load: the rest never land
    waves = _Waves(rows, missing)
    absent, taken = list(missing), set()
    for step in range(stop + 1):
        if step:
            absent.remove(landings[step - 1])
            waves.landed([e for e in waves.absent if e in absent])
        expected = [i for i, row in enumerate(rows) if i not in taken and not set(row) & set(absent)]
        assert waves.all_ready() == (len(expected) == len(rows) - len(taken))
        assert waves.ready_experts() == sorted({e for i in expected for e in rows[i]})
        assert waves.take_ready().tolist() == expected
        taken.update(expected)
        assert waves.done() == (len(taken) == len(rows))
    assert waves.left().tolist() == [i for i in range(len(rows)) if i not in taken]
    assert waves.needed() == {e for i in range(len(rows)) if i not in taken for e in rows[i]}


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_load_order_of_distinct_rows_with_counts_is_that_of_every_row(data):
    rows = data.draw(st.lists(st.lists(st.integers(0, 7), min_size=2, max_size=2, unique=True).map(tuple),
                              min_size=1, max_size=40))
    missing = data.draw(st.lists(st.sampled_from(sorted({e for row in rows for e in row})), unique=True))
    waves = _Waves(rows, missing)
    assert load_order(waves.needs(), missing, counts=waves.sizes()) == load_order(rows, missing)
