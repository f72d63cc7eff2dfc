"""A budget between two even splits: the spare slots go to some layers, and tokens stay stock's.

tiny-pymoe (6 MoE layers x 16 experts, top-2) at 30% of its experts: 28.8
experts' worth of slots, so an even split (4 per layer, 24) would leave 4
experts' worth idle; the plan gives 4 layers a fifth slot instead, and the
startup plan names the counts of each layer.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import TINY_PYMOE, offload_job, run_engines

pytestmark = pytest.mark.engine


def test_spare_slots_keep_stock_tokens_and_are_in_the_startup_plan(tmp_path):
    stock = run_engines(tmp_path / "stock", [offload_job("stock", TINY_PYMOE)], stock=True)["stock"]
    jobs = [offload_job("lru", TINY_PYMOE, policy="lru", budget="30%"),
            offload_job("fate", TINY_PYMOE, policy="fate", budget="30%")]
    got = run_engines(tmp_path / "offload", jobs, stock=False)
    assert got["lru"]["stats"][0]["layer_slots"] == [5, 5, 4, 5, 5, 4]
    # fate keeps no layer whole here (its rest would fall below 2 x top_k): the same spread
    assert got["fate"]["stats"][0]["layer_slots"] == [5, 5, 4, 5, 5, 4]
    for name in ("lru", "fate"):
        assert got[name]["tokens"] == stock["tokens"], name
        assert got[name]["stats"][0]["total"]["misses"] > 0  # offloaded: the slots were used
    log = Path(got["lru"]["log"]).read_text()
    assert "offloaded  layers 0-1, 3-4: 5/16 slots, layers 2, 5: 4/16 slots" in log
