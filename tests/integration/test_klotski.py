"""Klotski's switches inside vLLM: grouped steps, whole-layer prefetch, plain order; tokens stay stock's.

Random tiny Mixtral (correctness only). The engine's token budget is cut to 48
tokens so that the prompts below need several chunked-prefill steps in stock
vLLM; with ``groups`` the plugin's scheduler lets a step take up to
``klotski_max_group`` times that while loads dominate.
"""

from __future__ import annotations

import random

import pytest

from tests.conftest import run_engines

pytestmark = pytest.mark.engine

#: small token budget per step, so that prompts are chunked (stock) or grouped (klotski groups)
ENGINE = {"max_num_batched_tokens": 48, "max_num_seqs": 8}


def _prompts() -> list[list[int]]:
    rng = random.Random(5)
    return [[1] + [rng.randrange(32, 127) for _ in range(rng.randrange(20, 60))] for _ in range(6)]


def _job(name, model, stock=False, **settings):
    engine = dict(ENGINE)
    if not stock:
        engine["additional_config"] = {"moe_offload": {"policy": "klotski", "budget": "50%", **settings}}
    return {"name": name, "model": str(model), "engine": engine, "prompts": _prompts(), "max_tokens": 12}


@pytest.fixture(scope="module")
def results(tiny_models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("klotski")
    model = tiny_models["mixtral"]
    stock = run_engines(tmp / "stock", [_job("stock", model, stock=True)], stock=True)
    offload = run_engines(tmp / "offload", [
        _job("all", model),
        _job("none", model, klotski_features="none"),
        _job("hot,reorder", model, klotski_features="hot,reorder"),
        _job("groups x2", model, klotski_features="groups", klotski_max_group=2),
    ], stock=False)
    return stock["stock"], offload


@pytest.mark.parametrize("name", ["all", "none", "hot,reorder", "groups x2"])
def test_every_ablation_row_gives_stocks_tokens(results, name):
    stock, offload = results
    assert "error" not in offload[name], offload[name].get("error")
    assert offload[name]["tokens"] == stock["tokens"]


def test_groups_widen_steps_and_the_others_leave_them_alone(results):
    _, offload = results
    assert all(r["stats"] for r in offload.values()), [r.get("stats_error") for r in offload.values()]
    klotski = {name: r["stats"][0]["klotski"] for name, r in offload.items()}
    assert klotski["all"]["features"] == ["groups", "hot", "reorder"]
    assert klotski["none"]["features"] == []
    # 6 prompts of 20-60 tokens: more than one 48-token step, so a widened step takes more than 48
    assert klotski["all"]["grouped_steps"] >= 1
    assert klotski["groups x2"]["grouped_steps"] >= 1
    assert "grouped_steps" not in klotski["hot,reorder"]  # vLLM's own scheduler ran
    assert "grouped_steps" not in klotski["none"]
    # with groups, fewer steps read the experts of the prompts than with vLLM's 48-token steps
    assert klotski["all"]["steps"] < offload["hot,reorder"]["stats"][0]["layers"][0]["steps"]
