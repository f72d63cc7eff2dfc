"""Tensor parallel 2 on the CPU backend: each rank offloads its shard of every expert.

Stock vLLM TP=2 runs here with one core per rank (``VLLM_CPU_OMP_THREADS_BIND='0|1'``;
the default binding refuses on one NUMA node). TP needs vLLM's multiprocess mode,
so every engine costs about 30 s to start: one subprocess runs the stock engines,
one the offloaded ones.
"""

from __future__ import annotations

import pytest

from tests.conftest import PROMPTS, run_engines

pytestmark = [pytest.mark.slow, pytest.mark.engine]

TP = 2
#: the tiny mixtral's experts: 2 MoE layers x 8 experts x 3 x 128 x 256 x 2 bytes = 3 MiB in all;
#: 1.5 MiB is half, so each rank gets 768 KiB for its half-size shards: 4 of 8 experts per layer
BYTES_BUDGET = "1.5MiB"
RANK_BUDGET_BYTES = 786432
SHARD_EXPERT_BYTES = 3 * 128 * 256 * 2 // TP

CASES = {
    "mixtral/lru/50%": ("mixtral", {"policy": "lru", "budget": "50%"}),
    "mixtral/fate/1.5MiB": ("mixtral", {"policy": "fate", "budget": BYTES_BUDGET}),
    "qwen2_moe/lru/50%": ("qwen2_moe", {"policy": "lru", "budget": "50%"}),
}


def _job(name, model, section=None):
    engine = {"tensor_parallel_size": TP}
    if section:
        engine["additional_config"] = {"moe_offload": section}
    return {"name": name, "model": str(model), "engine": engine, "prompts": PROMPTS, "max_tokens": 24}


@pytest.fixture(scope="module")
def results(tiny_models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tp")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # one core per rank
        archs = sorted({arch for arch, _ in CASES.values()})
        stock = run_engines(
            tmp / "stock", [_job(arch, tiny_models[arch]) for arch in archs], stock=True, multiprocess=True,
        )
        offload = run_engines(
            tmp / "offload", [_job(name, tiny_models[arch], section) for name, (arch, section) in CASES.items()],
            stock=False, multiprocess=True,
        )
    return stock, offload


@pytest.mark.parametrize("name", list(CASES))
def test_tp2_tokens_identical_to_stock_tp2(results, name):
    stock, offload = results
    arch = CASES[name][0]
    assert "error" not in stock[arch], stock[arch].get("error")
    assert "error" not in offload[name], offload[name].get("error")
    assert offload[name]["tokens"] == stock[arch]["tokens"]


@pytest.mark.parametrize("name", list(CASES))
def test_stats_rpc_answers_one_dict_per_rank(results, name):
    stats = results[1][name]["stats"]
    assert isinstance(stats, list) and len(stats) == TP
    for rank in stats:
        assert rank["total"]["misses"] > 0  # 4 of 8 slots: every rank really offloaded
        assert rank["slot_bytes"] <= rank["budget_bytes"]
    if "/lru/" in name:  # both ranks see the same routing, so LRU makes the same decisions on both
        assert [{k: r["total"][k] for k in ("hits", "misses", "loads")} for r in stats].count(
            {k: stats[0]["total"][k] for k in ("hits", "misses", "loads")}
        ) == TP


def test_each_rank_holds_its_shard_with_its_share_of_the_budget(results):
    for name in ("mixtral/lru/50%", "mixtral/fate/1.5MiB"):
        for rank in results[1][name]["stats"]:
            assert rank["expert_bytes"] == SHARD_EXPERT_BYTES
            assert rank["slots_per_layer"] == 4
    for rank in results[1]["mixtral/fate/1.5MiB"]["stats"]:
        assert rank["budget_bytes"] == RANK_BUDGET_BYTES
    log = open(results[1]["mixtral/fate/1.5MiB"]["log"]).read()
    assert "tensor-parallel rank 1 of 2" in log
