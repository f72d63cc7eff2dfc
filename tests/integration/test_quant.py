"""Quantized experts end to end: real vLLM engines on a tiny random Mixtral.

The reference is stock vLLM (plugin off) on a copy of the checkpoint whose
experts hold their int4 quantized-then-dequantized values: the quantized tier
computes exactly that, so greedy tokens must be identical (both paths end in the
same bf16 values, converted by the same vLLM code). A second engine in the same
process reuses the store without rebuilding it, visible in the log.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import offload_job as _job
from tests.conftest import run_engines
from vllm_moe_offload.runtime.quant_reference import write_dequantized_checkpoint

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def results(tiny_models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quant")
    model = tiny_models["mixtral"]
    reference = tmp / "mixtral-int4-dequantized"
    assert write_dequantized_checkpoint(model, reference, bits=4) == 2 * 8 * 3  # layers x experts x projections
    (tmp / "a-file").write_text("")
    stock = run_engines(tmp / "stock", [_job("reference", reference), _job("original", model)], stock=True)
    offload = run_engines(
        tmp / "offload",
        [
            _job("int4/first", model, policy="lru", budget="50%", quant="int4"),
            _job("int4/second", model, policy="lru", budget="50%", quant="int4"),
            _job("int4+int2", model, policy="fate", budget="50%", quant="int4+int2", cache_dir=str(tmp / "stores")),
            # a 120-token prefill: its least-needed experts load their int2 copy
            {**_job("int4+int2/prefill", model, policy="lru", budget="25%", quant="int4+int2",
                    cache_dir=str(tmp / "stores")), "prompts": [[1] + [65 + i % 26 for i in range(119)]]},
            # a cache directory that cannot be created (its parent is a file): fails at start-up
            _job("unwritable", model, policy="lru", quant="int4", cache_dir=str(tmp / "a-file" / "stores")),
        ],
        stock=False,
    )
    return tmp, stock, offload


@pytest.mark.parametrize("name", ["int4/first", "int4/second", "int4+int2"])
def test_tokens_equal_stock_on_the_dequantized_checkpoint(results, name):
    _, stock, offload = results
    got = offload[name]
    assert "error" not in got, got.get("error")
    assert got["tokens"] == stock["reference"]["tokens"]
    stats = got["stats"][0]
    total = stats["total"]
    assert total["bytes_read"].get("quant", 0) > 0 and "disk" not in total["bytes_read"]
    # int4 of a bf16 expert: 4 bits plus 2 x 16 bits per 64 values is 28% (29% once 4 KiB-aligned)
    assert total["bytes_read"]["quant"] / total["loads"] < stats["expert_bytes"] / 3


def test_quantization_changes_the_weights(results):
    """The reference really differs from the original (else equality above would prove nothing)."""
    tmp, stock, _ = results
    # the two checkpoints' expert bytes differ; tokens may or may not, on a random model
    original = Path(json.loads((tmp / "stock" / "jobs.json").read_text())[1]["model"])
    reference = tmp / "mixtral-int4-dequantized"
    assert (original / "model.safetensors").read_bytes() != (reference / "model.safetensors").read_bytes()


def test_store_built_once_then_reused(results):
    tmp, _, offload = results
    log = Path(offload["int4/first"]["log"]).read_text()
    assert log.count("wrote the int4 expert store") == 1
    assert log.count("using the int4 expert store") == 1  # the second engine
    stores = tmp / "offload" / "vllm-cache" / "moe_offload" / "stores"
    (store,) = stores.iterdir()
    assert store.name.endswith("-int4") and (store / "manifest.json").is_file()


def test_cache_dir_setting_places_the_store(results):
    tmp, _, offload = results
    log = Path(offload["int4+int2"]["log"]).read_text()
    assert log.count("wrote the int4+int2 expert store") == 1
    (store,) = (tmp / "stores").iterdir()
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["scheme"] == "int4+int2" and set(manifest["precisions"]) == {"int4", "int2"}


def test_unwritable_cache_dir_fails_at_startup_naming_it(results):
    tmp, _, offload = results
    error = offload["unwritable"].get("error", "")
    assert f"cannot write the int4 expert store under {tmp / 'a-file' / 'stores'}" in error
    assert "cache_dir" in error


def test_int2_only_for_the_least_needed_experts_of_a_prefill(results):
    _, _, offload = results
    long_prefill = offload["int4+int2/prefill"]["stats"][0]["total"]
    assert long_prefill["low_precision_loads"] > 0
    assert long_prefill["low_precision_loads"] < long_prefill["loads"]  # the others in int4
    # short prompts and decode steps never use int2 (their tokens equal the int4 reference above)
    assert offload["int4+int2"]["stats"][0]["total"]["low_precision_loads"] == 0
