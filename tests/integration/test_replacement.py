"""The ``replacement`` setting in real engines: the chosen policy runs, and tokens stay stock's."""

from __future__ import annotations

import pytest

from tests.conftest import offload_job, run_engines

pytestmark = pytest.mark.engine


def test_replacement_runs_and_keeps_stock_tokens(tiny_models, tmp_path):
    model = tiny_models["mixtral"]
    stock = run_engines(tmp_path / "stock", [offload_job("stock", model)], stock=True)
    offload = run_engines(tmp_path / "offload", [
        # the minimum budget (top_k of 8 slots) evicts at nearly every step; fate also prefetches
        offload_job("lru/decay", model, policy="lru", budget="25%", replacement="decay"),
        offload_job("fate/lfru", model, policy="fate", budget="50%", replacement="lfru"),
        # nextuse keys by each decode step's token (integration/policy_inputs.py)
        offload_job("lru/nextuse", model, policy="lru", budget="25%", replacement="nextuse"),
    ], stock=False)
    for name, result in offload.items():
        assert "error" not in result, result.get("error")
        assert result["tokens"] == stock["stock"]["tokens"], name
        assert result["stats"][0]["total"]["misses"] > 0, name
    log = open(offload["lru/decay"]["log"]).read()
    assert "  cache      decay replacement" in log and "  cache      lfru replacement" in log
    assert "  cache      nextuse replacement" in log
