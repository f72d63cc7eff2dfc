"""core/prefetch_gate.py: a prediction's loads start only where its measured precision pays for the risk."""

from __future__ import annotations

import pytest

from vllm_moe_offload.core.prefetch_gate import PrefetchGate


def test_open_until_both_times_are_measured():
    gate = PrefetchGate()
    for _ in range(50):
        gate.record(1, predicted=2, right=0)
    assert gate.pays(1, 1, load_s=None, layer_s=0.001) and gate.pays(1, 1, load_s=0.002, layer_s=None)
    assert not gate.pays(1, 1, load_s=0.002, layer_s=0.001)


def test_the_break_even_precision():
    """One layer ahead with 1.9 ms loads and 0.6 ms layers needs 1.9 / 2.5 = 0.76; three layers ahead 0.51."""
    for right_of_100, one, three in ((90, True, True), (65, False, True), (40, False, False)):
        gate = PrefetchGate()
        for n in range(100):
            gate.record("k", predicted=1, right=int(n % 20 < right_of_100 // 5))  # spread evenly
        assert gate.pays("k", 1, load_s=0.0019, layer_s=0.0006) is one, right_of_100
        assert gate.pays("k", 3, load_s=0.0019, layer_s=0.0006) is three, right_of_100
    # a lead longer than the load saves one load at most: 0.5 is the break-even however far ahead
    gate = PrefetchGate()
    gate.record("k", predicted=10, right=5)
    assert gate.pays("k", 8, load_s=0.002, layer_s=0.001)


def test_a_batchs_own_loads_come_off_the_lead():
    """A batch's layer computes while its own missing experts load; its prediction's loads queue behind them.
    9 GiB model: 28 ms loads, a prompt's layer 70 ms, always right (0.95): open with no backlog; behind the
    layer's own 8 misses (224 ms) there is no lead left and nothing to gain, however right; behind one (28 ms)
    the 42 ms left still cover a load."""
    gate = PrefetchGate()
    for _ in range(100):
        gate.record("batch", predicted=20, right=19)
    assert gate.pays("batch", 1, load_s=0.028, layer_s=0.070)
    assert not gate.pays("batch", 1, load_s=0.028, layer_s=0.070, backlog_s=8 * 0.028)
    assert gate.pays("batch", 1, load_s=0.028, layer_s=0.070, backlog_s=0.028)
    # two layers ahead: 140 ms of compute before the need, 224 ms of the layer's own loads: still none
    assert not gate.pays("batch", 2, load_s=0.028, layer_s=0.070, backlog_s=8 * 0.028)
    assert gate.pays("batch", 4, load_s=0.028, layer_s=0.070, backlog_s=8 * 0.028)


def test_recent_predictions_weigh_most_and_keys_keep_apart():
    gate = PrefetchGate()
    for _ in range(200):
        gate.record((1, False), predicted=2, right=2)
    for _ in range(200):
        gate.record((1, False), predicted=2, right=0)  # the routing changed: the old record fades
    assert gate.precision((1, False)) < 0.05
    assert gate.precision((1, True)) == 0.5  # another key: no record yet
    gate.record((1, True), predicted=0, right=0)  # nothing missing was predicted: nothing learned
    assert gate.precision((1, True)) == 0.5
    with pytest.raises(ValueError, match="within 0..predicted"):
        gate.record((1, True), predicted=1, right=2)


def test_a_right_prediction_saves_no_more_than_the_demand_load_would_have_stalled():
    """A batch's layer computes its resident tokens while its missing experts load, so a demand load stalls it
    for part of its read time; a right prediction can save only that. The padded tiny Mixtral's 32-request
    batch at 50%: 0.8 ms loads stalling 0.26 ms each, 0.85 of the loaded predictions used, layers long."""
    gate = PrefetchGate()
    for _ in range(100):
        gate.record("batch", predicted=20, right=17)
    assert gate.stall_per_miss("batch") is None
    assert gate.pays("batch", 1, load_s=0.0008, layer_s=0.005)  # unmeasured stall: the whole load saved
    gate.record_stall("batch", 0.0026, 10)
    gate.record_stall("batch", 0.0, 0)  # a step without misses teaches nothing
    assert gate.stall_per_miss("batch") == pytest.approx(0.00026)
    assert gate.pays("batch", 1, load_s=0.0008, layer_s=0.005, stall_s=gate.stall_per_miss("batch"))
    # 4 of each step's loads evicted experts the next step needed again: each counts as a wrong prediction
    for _ in range(100):
        gate.record("batch", predicted=20, right=17)
        for _ in range(4):
            gate.record_harm("batch")
    assert gate.precision("batch") == pytest.approx(17 / 24, abs=0.02)
    assert gate.pays("batch", 1, load_s=0.0008, layer_s=0.005)  # a whole load saved would still pay
    assert not gate.pays("batch", 1, load_s=0.0008, layer_s=0.005, stall_s=gate.stall_per_miss("batch"))
    # the smoothed stall follows recent steps
    for _ in range(50):
        gate.record_stall("batch", 0.0008, 1)
    assert gate.stall_per_miss("batch") == pytest.approx(0.0008, rel=0.01)
    assert gate.stall_per_miss("token") is None  # kinds keep apart
