"""Activation profiles: saved at shutdown, loaded at start-up, warm cache, clear errors.

Real engines on a tiny random Mixtral (correctness and mechanics only: random
routing says nothing about real hit rates).
"""

from __future__ import annotations

import pytest

from tests.conftest import PROMPTS, run_engines

pytestmark = pytest.mark.engine


def _job(name, model, section):
    return {
        "name": name, "model": str(model), "prompts": PROMPTS, "max_tokens": 16,
        "engine": {"additional_config": {"moe_offload": {"budget": "50%", **section}}},
    }


def test_a_saved_profile_warms_the_next_start(tiny_models, tmp_path):
    model = tiny_models["mixtral"]
    profile = tmp_path / "profile.npz"
    jobs = [
        _job("save", model, {"policy": "klotski", "save_profile": str(profile)}),
        _job("cold", model, {"policy": "lru"}),
        _job("warm", model, {"policy": "lru", "profile": str(profile)}),
        _job("warm-klotski", model, {"policy": "klotski", "profile": str(profile)}),
    ]
    stock = run_engines(tmp_path / "stock", [{**jobs[1], "engine": {}}], stock=True)["cold"]
    results = run_engines(tmp_path / "offload", jobs, stock=False)
    for name in ("save", "cold", "warm", "warm-klotski"):
        assert results[name]["tokens"] == stock["tokens"], name
    assert profile.is_file()
    cold, warm = results["cold"]["stats"][0]["total"], results["warm"]["stats"][0]["total"]
    # the same prompts again: the profile's most used experts are resident from the start
    assert warm["misses"] < cold["misses"]
    assert results["warm-klotski"]["stats"][0]["klotski"]["tokens_seen"] > results["save"]["stats"][0]["klotski"][
        "tokens_seen"
    ]
    assert "activation profile" in open(results["warm"]["log"]).read()


def test_a_profile_of_another_model_is_refused(tiny_models, tmp_path):
    from vllm_moe_offload.core.correlation import CorrelationTable

    profile = CorrelationTable(num_layers=5, num_experts=8, top_k=2, model="other").save(tmp_path / "other.npz")
    use = _job("use", tiny_models["mixtral"], {"policy": "lru", "profile": str(profile)})
    result = run_engines(tmp_path, [use], stock=False)["use"]
    assert "error" in result, "a profile of another geometry must not start"
    assert "rebuild the profile" in result["error"] + open(result["log"]).read()
