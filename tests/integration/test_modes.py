"""Offload under vLLM's default compiled mode, and on a model without MoE layers."""

from __future__ import annotations

import pytest

from tests.conftest import PROMPTS, run_engines

pytestmark = pytest.mark.engine

OFFLOAD = {"moe_offload": {"policy": "lru", "budget": "50%"}}


def _job(name, model, compiled, offload):
    engine = {"enforce_eager": not compiled}
    if offload:
        engine["additional_config"] = OFFLOAD
    return {"name": name, "model": str(model), "engine": engine, "prompts": PROMPTS, "max_tokens": 24}


@pytest.mark.slow
def test_compiled_mode_matches_compiled_stock(tiny_models, tmp_path):
    """torch.compile (vLLM's default) traces around the offload op and keeps tokens exact."""
    model = tiny_models["mixtral"]
    stock = run_engines(tmp_path / "stock", [_job("stock", model, True, False)], stock=True)
    offload = run_engines(tmp_path / "offload", [_job("lru", model, True, True)], stock=False)
    assert "error" not in offload["lru"], offload["lru"].get("error")
    assert offload["lru"]["tokens"] == stock["stock"]["tokens"]
    assert offload["lru"]["stats"][0]["total"]["misses"] > 0


def test_dense_model_runs_unchanged_with_one_warning(tiny_models, tmp_path):
    model = tiny_models["llama"]
    stock = run_engines(tmp_path / "stock", [_job("stock", model, False, False)], stock=True)
    offload = run_engines(tmp_path / "offload", [_job("lru", model, False, True)], stock=False)
    assert offload["lru"]["tokens"] == stock["stock"]["tokens"]
    assert offload["lru"]["stats"] == [{}]
    log = open(offload["lru"]["log"]).read()
    assert log.count("has no MoE layers") == 1
