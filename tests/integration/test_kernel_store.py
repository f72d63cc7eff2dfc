"""The kernel-layout store end to end: real vLLM engines on a tiny random Mixtral.

Stock vLLM (plugin off) on the same checkpoint is the reference: the store holds
the bytes vLLM's own conversion gives each expert, so greedy tokens must be
identical. The first engine builds the store; the next ones in the same process
reuse it, and no load converts anything (the statistics say how loads reach the
kernel layout, and which tier the bytes came from). The packed store (the same
bytes coded losslessly) likewise, once in vLLM's default multiprocess engine.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.conftest import offload_job as _job
from tests.conftest import run_engines

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def results(tiny_models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kernel-store")
    model = tiny_models["mixtral"]
    stock = run_engines(tmp / "stock", [_job("stock", model)], stock=True)
    offload = run_engines(
        tmp / "offload",
        [
            _job("lru/first", model, policy="lru", budget="25%", store="kernel"),
            _job("fate", model, policy="fate", budget="50%", store="kernel"),
            _job("klotski", model, policy="klotski", budget="25%", store="kernel", io_threads=2),
            _job("checkpoint", model, policy="lru", budget="25%"),
        ],
        stock=False,
    )
    packed = run_engines(
        tmp / "packed",
        [
            _job("packed/lru", model, policy="lru", budget="25%", store="packed"),
            _job("packed/fate", model, policy="fate", budget="50%", store="packed", io_threads=2),
        ],
        stock=False,
    )
    packed_mp = run_engines(tmp / "packed-mp", [_job("packed/multiprocess", model, policy="klotski", budget="25%",
                                                     store="packed")], stock=False, multiprocess=True)
    return tmp, stock, {**offload, **packed, **packed_mp}


def _stock_tokens_from_store_reads(results, name: str) -> dict:
    """The run's offload stats, once its tokens are stock's and every load read the store (kernel layout)."""
    _, stock, offload = results
    got = offload[name]
    assert "error" not in got, got.get("error")
    assert got["tokens"] == stock["stock"]["tokens"]
    stats = got["stats"][0]
    assert stats["total"]["loads"] > 0
    assert set(stats["total"]["bytes_read"]) == {"kernel"}, stats["total"]["bytes_read"]
    return stats


@pytest.mark.parametrize("name", ["lru/first", "fate", "klotski"])
def test_tokens_equal_stock_and_loads_only_read(results, name):
    stats = _stock_tokens_from_store_reads(results, name)
    total = stats["total"]
    # one expert's block per load (w13 and w2 in kernel layout, 4 KiB-aligned), nothing converted
    assert total["bytes_read"]["kernel"] < total["loads"] * (stats["expert_bytes"] + 8192)
    assert stats["conversion"] == ["none (read in kernel layout from the kernel store)"]


def test_kernel_loads_reserve_no_conversion(results):
    _, _, offload = results
    checkpoint = offload["checkpoint"]["stats"][0]
    # a load that converts reserves a read buffer of the checkpoint's span and conversion temporaries of more
    assert checkpoint["staging_bytes"] > 3 * checkpoint["expert_bytes"]
    for name in ("lru/first", "fate", "klotski"):
        stats = offload[name]["stats"][0]
        # a kernel-store load lands in its slot: at most a read buffer for what is not aligned, no conversion
        assert stats["staging_bytes"] < stats["expert_bytes"] * (2 if name == "klotski" else 1), name
        assert stats["peak_by_kind"].get("convert", 0) == 0, name
        assert stats["peak_held_bytes"] <= stats["budget_bytes"]


def test_the_checkpoint_path_still_converts(results):
    _, stock, offload = results
    got = offload["checkpoint"]
    assert got["tokens"] == stock["stock"]["tokens"]
    assert set(got["stats"][0]["total"]["bytes_read"]) == {"disk"}
    assert got["stats"][0]["conversion"] != ["none (read in kernel layout from the kernel store)"]


def test_store_built_once_per_process_then_reused(results):
    tmp, _, offload = results
    log = Path(offload["lru/first"]["log"]).read_text()
    assert log.count("wrote the kernel expert store") == 1
    assert log.count("using the kernel expert store") == 2  # the fate and klotski engines
    stores = tmp / "offload" / "vllm-cache" / "moe_offload" / "stores"
    (store,) = stores.iterdir()
    assert store.name.endswith("-kernel-tp0of1")
    manifest = json.loads((store / "manifest.json").read_text())
    layout = manifest["precisions"]["kernel"]
    assert layout["tp_size"] == 1 and layout["backend"] == "CPU" and layout["isa"]
    assert layout["vllm"] and layout["torch"]


@pytest.mark.parametrize("name", ["packed/lru", "packed/fate", "packed/multiprocess"])
def test_packed_store_tokens_equal_stock_from_fewer_bytes(results, name):
    stats = _stock_tokens_from_store_reads(results, name)
    total, offload = stats["total"], results[2]
    assert stats["conversion"][0].startswith("none (read in kernel layout from the packed store, decoded by C")
    kernel = offload["lru/first"]["stats"][0]["total"]
    per_load = total["bytes_read"]["kernel"] / total["loads"]
    assert per_load < 0.9 * kernel["bytes_read"]["kernel"] / kernel["loads"]  # whole 4 KiB blocks of each
    # a packed load stages two pieces of its block in a read buffer and converts nothing
    assert stats["peak_by_kind"].get("convert", 0) == 0
    assert stats["peak_held_bytes"] <= stats["budget_bytes"]


def test_packed_store_built_once_beside_the_kernel_store(results):
    tmp, _, offload = results
    log = Path(offload["packed/lru"]["log"]).read_text()
    assert log.count("wrote the packed expert store") == 1 and log.count("using the packed expert store") == 1
    assert re.search(r"using the packed expert store at .*, decoded by C", log)  # ready before the first load
    (store,) = (tmp / "packed" / "vllm-cache" / "moe_offload" / "stores").iterdir()
    assert store.name.endswith("-packed-tp0of1")
    assert json.loads((store / "manifest.json").read_text())["precisions"]["packed"]["coding"]
