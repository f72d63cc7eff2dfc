"""``vllm-moe-offload bench --quick`` end to end on the trained tiny-pymoe (no timing assertions)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import TINY_PYMOE
from vllm_moe_offload.cli.main import main

pytestmark = pytest.mark.engine

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    rc = main([
        "bench", str(TINY_PYMOE), "--quick", "--policies", "ondemand,lru", "--budgets", "25%",
        "--tokens", str(TINY_PYMOE / "heldout-tokens.npy"), "--no-drop-cache", "--out", str(out),
    ])
    assert rc == 0
    return out, json.loads((out / "bench.json").read_text())


def test_runs_and_files(bench):
    out, report = bench
    assert [r["name"] for r in report["runs"]] == ["stock", "ondemand 100%", "ondemand 25%", "lru 25%"]
    for name in ("bench.md", "bench-speed.png", "bench-cache.png", "bench.log"):
        assert (out / name).exists()
    for name in ("bench-speed.png", "bench-cache.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    md = (out / "bench.md").read_text()
    assert "shared development machine" in md and "| lru 25% |" in md and "(x" in md


def test_offload_runs_match_stock_and_respect_the_budget(bench):
    _, report = bench
    for run in report["runs"][1:]:
        assert run["offload"]["slot_bytes"] <= run["offload"]["budget_bytes"]
        for name, workload in run["workloads"].items():
            assert workload["tokens_match_stock"], (run["name"], name)
            assert workload["generated_tokens"] > 0 and workload["wall_s"] > 0
    full = report["runs"][1]["offload_total"]
    assert full["misses"] == 0 and full["hit_rate"] == 1.0
    for run in report["runs"][2:]:
        assert run["offload_total"]["misses"] > 0
        assert sum(run["offload_total"]["bytes_read"].values()) > 0
        assert run["workloads"]["decode"]["offload"]["demand_hit_rate"] < 1.0
    ondemand, lru = report["runs"][2], report["runs"][3]
    assert ondemand["offload_total"]["loads"] > lru["offload_total"]["loads"]


def test_page_cache_is_measured(bench):
    _, report = bench
    for run in report["runs"]:
        assert run["page_cache_after"]["expert_bytes"] > 0
        assert "drop_cache_error" not in run  # --no-drop-cache
