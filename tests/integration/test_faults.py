"""I/O faults while serving: only the requests that needed the missing expert fail.

Real engines on a tiny random Mixtral (8 experts, top-2, 2 MoE layers), LRU
at 75% (6 of 8 experts per layer). Two "warm" one-token prompts run first, so
their experts are resident; then the fault, then the warm prompts again with
fourteen others, whose experts are mostly not resident. Faults are real: the
checkpoint is truncated after start-up, or every load is slowed past the load
timeout by the link emulator. A request either fails with an error and no
tokens, or gives stock vLLM's tokens.
"""

from __future__ import annotations

import os
import shutil
import time

import pytest

from tests.conftest import run_engines, split_round
from vllm_moe_offload.runtime.safetensors_io import CheckpointIndex

pytestmark = pytest.mark.engine

WARM = [[65], [66]]
OTHERS = [[t] for t in range(67, 81)]
PROMPTS = WARM + OTHERS


def _job(name, model, offload=None, rounds=None):
    engine = {"enable_prefix_caching": True}
    if offload is not None:
        engine["additional_config"] = {"moe_offload": {"policy": "lru", "budget": "75%", **offload}}
    job = {"name": name, "model": str(model), "engine": engine, "prompts": PROMPTS, "max_tokens": 1}
    if rounds:
        job["rounds"] = rounds
    return job


@pytest.fixture(scope="module")
def stock(tiny_models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults-stock")
    return run_engines(tmp, [_job("stock", tiny_models["mixtral"])], stock=True)["stock"]


def _truncated_after_warm_up(tiny_models, tmp_path):
    """A copy of the tiny Mixtral, and the rounds: the warm prompts, the checkpoint truncated then every
    prompt, every prompt again."""
    model = tmp_path / "model"
    shutil.copytree(tiny_models["mixtral"], model)
    checkpoint = next(model.glob("*.safetensors"))
    return model, [
        {"prompts": WARM},
        {"prompts": PROMPTS, "faults": [{"truncate": str(checkpoint), "at_bytes": 4096}]},
        {"prompts": PROMPTS},
    ]


def test_truncated_checkpoint_fails_only_requests_that_needed_a_lost_expert(tiny_models, stock, tmp_path):
    model, rounds = _truncated_after_warm_up(tiny_models, tmp_path)
    # the cache's demand path alone, so that the warm requests' experts stay resident: with the fill
    # (layer_ahead.py) on, its loads take the slots this job leaves free, and a warm request's expert can be
    # evicted and then fail to reload (tests/integration/test_tp.py); the defaults are tested below
    offload = {"layer_ahead": False}
    result = run_engines(tmp_path / "run", [_job("truncated", model, offload, rounds)], stock=False)["truncated"]
    assert result["rounds"][0]["tokens"] == stock["tokens"][:2]
    ok, failed = split_round(result["rounds"][1], stock["tokens"])
    assert {0, 1} <= set(ok), "requests served by resident experts must go on"
    assert failed, "requests that needed an unreadable expert must fail"
    again_ok, _ = split_round(result["rounds"][2], stock["tokens"])  # the engine goes on
    assert {0, 1} <= set(again_ok)
    log = open(result["log"]).read()
    assert "changed after start-up" in log or "short read" in log
    assert "failing requests" in log
    total = result["stats"][0]["total"]
    assert total["failed_loads"] > 0 and total["failed_tokens"] >= len(failed)


def test_truncated_checkpoint_with_the_defaults_in_the_default_multiprocess_engine(tiny_models, stock, tmp_path):
    # As users run: vLLM's multiprocess engine and the offload defaults (the next-layer fill on), under which a
    # warm request's expert may be evicted and fail to reload (seen: tests/integration/test_tp.py's _fault_job).
    # Which requests fail is the cache's business; that a failed one streamed nothing, that every other one
    # gave stock's tokens and that the engine goes on serving is not.
    model, rounds = _truncated_after_warm_up(tiny_models, tmp_path)
    result = run_engines(tmp_path / "run", [_job("defaults", model, {}, rounds)], stock=False,
                         multiprocess=True)["defaults"]
    assert "error" not in result, result.get("error")
    assert result["rounds"][0]["tokens"] == stock["tokens"][:2]
    _, failed = split_round(result["rounds"][1], stock["tokens"])
    assert failed, "requests that needed an unreadable expert must fail"
    _, failed_again = split_round(result["rounds"][2], stock["tokens"])  # the engine goes on
    log = open(result["log"]).read()
    assert "failing requests" in log
    total = result["stats"][0]["total"]
    assert total["failed_loads"] > 0 and total["failed_tokens"] >= len(failed) + len(failed_again)
    assert total["layer_ahead_predicted"] > 0  # the fill ran


def test_loads_past_the_timeout_fail_their_requests_without_hanging(tiny_models, stock, tmp_path):
    # every load lasts >= 0.6 s; a step waits 0.1 s for one; late loads land during the pauses.
    # The warm prompts need two rounds: in the first, layer 1 routes their zeroed rows.
    offload = {"link_latency_ms": 600, "load_timeout_s": 0.1, "io_threads": 4}
    rounds = [{"prompts": WARM, "pause_s": 4}, {"prompts": WARM, "pause_s": 4}, {"prompts": PROMPTS}]
    started = time.perf_counter()
    result = run_engines(tmp_path, [_job("slow", tiny_models["mixtral"], offload, rounds)], stock=False)["slow"]
    assert time.perf_counter() - started < 240
    first_ok, first_failed = split_round(result["rounds"][0], stock["tokens"][:2])
    assert first_failed == [0, 1] and not first_ok  # nothing was resident and every load was late
    split_round(result["rounds"][1], stock["tokens"][:2])
    ok, failed = split_round(result["rounds"][2], stock["tokens"])
    assert {0, 1} <= set(ok), "the late loads must have landed in their slots and be used"
    assert failed
    assert "took longer than 0.1 s" in open(result["log"]).read()


def test_a_broken_checkpoint_fails_at_startup_naming_file_and_tensor(tiny_models, tmp_path):
    from safetensors.torch import load_file, save_file

    source = tiny_models["mixtral"]
    truncated, missing = tmp_path / "truncated", tmp_path / "missing"
    for folder in (truncated, missing):
        shutil.copytree(source, folder)
    checkpoint = next(truncated.glob("*.safetensors"))
    cut = CheckpointIndex(truncated)["model.layers.0.block_sparse_moe.experts.3.w1.weight"]
    os.truncate(checkpoint, cut.offset + 10)  # that expert tensor and everything after it
    path = next(missing.glob("*.safetensors"))
    tensors = load_file(str(path))
    gone = "model.layers.1.block_sparse_moe.experts.5.w2.weight"
    del tensors[gone]
    save_file(tensors, str(path))
    jobs = [
        _job("truncated", truncated, {"budget": "50%"}),
        _job("missing", missing, {"budget": "50%"}),
        _job("too-big", source, {"budget": "1GiB"}),
    ]
    results = run_engines(tmp_path / "run", jobs, stock=False)
    log = open(results["too-big"]["log"]).read()
    assert "is truncated" in results["truncated"]["error"] and str(checkpoint) in results["truncated"]["error"]
    assert f"{gone} is missing" in results["missing"]["error"]
    # a budget above what the model needs: a warning, everything resident, tokens as usual
    assert "more than all experts need" in log
    assert "error" not in results["too-big"] and results["too-big"]["stats"][0]["total"]["misses"] == 0
