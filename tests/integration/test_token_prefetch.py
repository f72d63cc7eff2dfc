"""Next-token prefetch in real engines: batch-1 decode loads each layer's experts from the step's input token.

On by default for fate (``token_prefetch``); tokens stay stock vLLM's. The trained tiny-pymoe (learned
routing) gives the prediction figures: one request per round of held-out text, so that its decode steps
run at batch 1, where the table predicts; its prompts teach the table too.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import TINY_PYMOE, offload_total, round_tokens, run_engines

pytestmark = pytest.mark.engine


def _rounds() -> list[dict]:
    tokens = np.load(TINY_PYMOE / "heldout-tokens.npy")
    return [{"prompts": [[1] + tokens[start:start + 24].tolist()]} for start in (0, 5000, 20000)]


def _job(name: str, **offload) -> dict:
    engine = {"additional_config": {"moe_offload": {"budget": "25%", **offload}}} if offload else {}
    return {"name": name, "model": str(TINY_PYMOE), "engine": engine, "rounds": _rounds(), "max_tokens": 48}


@pytest.fixture(scope="module")
def stock(tiny_models, tmp_path_factory):
    return run_engines(tmp_path_factory.mktemp("stock"), [_job("stock")], stock=True)["stock"]


def test_token_prefetch_keeps_stock_tokens_and_predicts_trained_routing(stock, tmp_path):
    runs = run_engines(tmp_path, [
        _job("fate", policy="fate"),  # on by default
        _job("fate/off", policy="fate", token_prefetch=False),
        _job("lru", policy="lru"),
        # every prediction loaded, so that what it saves does not depend on the gate's measured times
        _job("lru/on", policy="lru", token_prefetch=True, prefetch_gate=False),
    ], stock=False)
    for name, result in runs.items():
        assert round_tokens(result) == round_tokens(stock), name
    fate, off, lru, lru_on = (offload_total(runs[name]) for name in ("fate", "fate/off", "lru", "lru/on"))
    precision = fate["token_table_right"] / fate["token_table_predicted"]
    print(f"trained tiny-pymoe, fate 25%: next-token table precision {precision:.3f} over "
          f"{fate['token_table_predicted']} predicted experts; lru misses {lru['misses']}, with the table's "
          f"prefetches {lru_on['misses']} ({lru_on['prefetch_hits']} prefetch hits of {lru_on['prefetch_loads']} "
          "loads)")
    assert precision > 0.5  # chance: top_k / num_experts = 0.125
    assert off["token_table_predicted"] == 0 and lru["token_table_predicted"] == 0
    # fate's routers predict a one-token step's next layer only where the table had nothing for the token
    assert fate["predicted"] < off["predicted"]
    assert lru_on["prefetch_gated"] == 0 and lru_on["prefetch_hits"] > 0
    assert lru_on["misses"] < lru["misses"]
    assert lru_on["prefetch_hits"] + lru_on["prefetch_unused"] <= lru_on["prefetch_loads"]
    plan = "  prediction batch-1 decode: each layer's experts loaded ahead from the step's input token"
    assert open(runs["fate"]["log"]).read().count(plan) == 2  # the runner's one log: fate's and lru/on's plans


def test_token_prefetch_in_the_default_multiprocess_engine(stock, tmp_path):
    """The prediction from the sampled token runs in the worker process, as users run it."""
    result = run_engines(tmp_path, [_job("fate", policy="fate")], stock=False, multiprocess=True)["fate"]
    assert round_tokens(result) == round_tokens(stock)
    total = offload_total(result)
    assert total["token_table_predicted"] > 0 and total["token_table_right"] > 0
