"""``pool = shared`` (and ``auto``, the default) in real engines: one slot pool for every offloaded layer,
tokens stay stock's.

On the shipped trained tiny-pymoe (6 MoE layers x 16 experts) at 25% each layer's share is 4 slots; with
one pool of 24 the layer that runs may hold 12, so the prompts' prefill runs in fewer passes than with a
pool per layer (a pass holds every expert its tokens need).
"""

from __future__ import annotations

import pytest

from tests.conftest import TINY_PYMOE, offload_job, run_engines

pytestmark = pytest.mark.engine


def test_shared_pool_keeps_stock_tokens_in_fewer_passes(tiny_models, tmp_path):
    stock = run_engines(tmp_path / "stock", [offload_job("stock", TINY_PYMOE)], stock=True)["stock"]
    runs = run_engines(tmp_path / "offload", [
        offload_job("lru/layer", TINY_PYMOE, policy="lru", budget="25%", pool="layer"),
        offload_job("lru/shared", TINY_PYMOE, policy="lru", budget="25%", pool="shared"),
        # fate prefetches into the pool from the layer before; klotski plans with its spare slots
        offload_job("fate/shared", TINY_PYMOE, policy="fate", budget="25%", pool="shared"),
        offload_job("klotski/shared", TINY_PYMOE, policy="klotski", budget="50%", pool="shared"),
        # the layers' nextuse predictions enter the pool's rule (the default only for experts of 16 MiB and more)
        offload_job("lru/nextuse/shared", TINY_PYMOE, policy="lru", budget="25%", pool="shared", replacement="nextuse"),
        # auto: shared for full-precision experts on the CPU backend, never for the Load-on-Demand baseline
        # nor with a replacement the user chose (it evicts within a layer's pool)
        offload_job("lru/auto", TINY_PYMOE, policy="lru", budget="25%"),
        offload_job("ondemand/auto", TINY_PYMOE, policy="ondemand", budget="25%"),
        offload_job("lru/decay/auto", TINY_PYMOE, policy="lru", budget="25%", replacement="decay"),
    ], stock=False)
    for name, result in runs.items():
        assert "error" not in result, result.get("error")
        assert result["tokens"] == stock["tokens"], name
        assert result["stats"][0]["total"]["misses"] > 0, name
    pools = {name: result["stats"][0]["pool"] for name, result in runs.items()}
    assert pools == {"lru/layer": "layer", "lru/shared": "shared", "fate/shared": "shared",
                     "klotski/shared": "shared", "lru/nextuse/shared": "shared", "lru/auto": "shared",
                     "ondemand/auto": "layer",
                     "lru/decay/auto": "layer"}
    layer, shared = (runs[name]["stats"][0]["total"] for name in ("lru/layer", "lru/shared"))
    assert shared["passes"] < layer["passes"], (shared["passes"], layer["passes"])
    assert shared["slots"] == layer["slots"] == 24  # the same budget: the shares add up to the pool
    log = open(runs["lru/shared"]["log"]).read()
    assert "  cache      lru replacement\n" in log
    assert "  pool       one pool of 24 slots shared by layers 0-5: the layer that runs takes up to 12" in log
    assert "(decayed use rate, and layer distance)" in log  # 192 KiB experts: no predictions by default
    predicted = open(runs["lru/nextuse/shared"]["log"]).read()
    assert "  cache      nextuse replacement\n" in predicted
    assert "(decayed use rate plus nextuse predicted uses, and layer distance)" in predicted


def test_shared_pool_in_the_default_multiprocess_engine(tiny_models, tmp_path):
    model = tiny_models["mixtral"]
    stock = run_engines(tmp_path / "stock", [offload_job("stock", model)], stock=True, multiprocess=True)["stock"]
    runs = run_engines(tmp_path / "shared", [
        offload_job("lru/shared", model, policy="lru", budget="25%", pool="shared"),
        offload_job("lru/nextuse/shared", model, policy="lru", budget="25%", pool="shared", replacement="nextuse"),
    ], stock=False, multiprocess=True)
    for got in runs.values():
        assert "error" not in got, got.get("error")
        assert got["tokens"] == stock["tokens"]
        assert "one pool of 4 slots shared by layers 0-1" in open(got["log"]).read()


def test_which_layers_of_a_shared_pool_predict():
    """nextuse (whose predictions enter the pool's rule) for experts of 16 MiB and more in a shared pool; the
    offload policy's own cache below that and with pools per layer; the user's replacement always."""
    from vllm_moe_offload.core.config import OffloadConfig
    from vllm_moe_offload.integration.setup import PREDICTED_POOL_MIN_EXPERT_BYTES, layer_policy_name

    big, small = PREDICTED_POOL_MIN_EXPERT_BYTES, PREDICTED_POOL_MIN_EXPERT_BYTES - 1
    lru, fate = OffloadConfig.from_dict({"policy": "lru"}), OffloadConfig.from_dict({"policy": "fate"})
    assert layer_policy_name(lru, pooled=True, expert_bytes=big) == "nextuse"
    assert layer_policy_name(fate, pooled=True, expert_bytes=96 * 2**20) == "nextuse"
    assert layer_policy_name(lru, pooled=True, expert_bytes=small) == "lru"
    assert layer_policy_name(fate, pooled=True, expert_bytes=small) == "arc"
    assert layer_policy_name(lru, pooled=False, expert_bytes=big) == "lru"
    decay = OffloadConfig.from_dict({"policy": "lru", "replacement": "decay", "pool": "shared"})
    assert layer_policy_name(decay, pooled=True, expert_bytes=big) == "decay"
