"""Offloaded experts are not materialized: the process holds far less anonymous memory than stock.

And everything the plugin allocates for experts (slots, read buffers, each
expert's conversion temporaries) is registered in the worker's budget ledger,
whose held and peak bytes never exceed the budget.
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import PROMPTS, run_engines
from vllm_moe_offload.core.plan import staging_for

pytestmark = [pytest.mark.engine, pytest.mark.slow]


def test_rss_anon_drops_by_the_offloaded_expert_bytes(tmp_path):
    from vllm_moe_offload.cli.tiny_models import make_tiny_model

    # experts dominate: 4 layers x 8 experts x 3 x 512 x 2048 x 2 bytes = 192 MiB of 209 MiB
    model = make_tiny_model(
        "mixtral", tmp_path / "model", hidden_size=512, intermediate_size=2048, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4,
    )
    expert_bytes = 4 * 8 * 3 * 512 * 2048 * 2
    job = {"model": str(model), "prompts": PROMPTS, "max_tokens": 8}
    stock = run_engines(tmp_path / "stock", [{**job, "name": "stock"}], stock=True)["stock"]
    offload = run_engines(
        tmp_path / "offload",
        [{**job, "name": "lru25", "engine": {"additional_config": {"moe_offload": {"policy": "lru", "budget": "25%"}}}}],
        stock=False,
    )["lru25"]
    assert offload["tokens"] == stock["tokens"]
    stats = offload["stats"][0]
    saved_kib = stock["rss_anon_kib"] - offload["rss_anon_kib"]
    report = {
        "stock_rss_anon_mib": stock["rss_anon_kib"] / 1024,
        "offload_25pct_rss_anon_mib": offload["rss_anon_kib"] / 1024,
        "expert_bytes_mib": expert_bytes / 2**20,
        "slot_bytes_mib": stats["slot_bytes"] / 2**20,
        "budget_bytes_mib": stats["budget_bytes"] / 2**20,
        "stock_startup_s": stock["startup_s"],
        "offload_startup_s": offload["startup_s"],
    }
    report.update(
        staging_mib=stats["staging_bytes"] / 2**20, peak_held_mib=stats["peak_held_bytes"] / 2**20,
        peak_by_kind=stats["peak_by_kind"],
    )
    print("memory:", json.dumps(report))
    # a share budget: 25% of the expert bytes for slots, the staging of the one I/O thread on top
    staging = staging_for(io_threads=1, expert_bytes=expert_bytes // 32, read_span_bytes=expert_bytes // 32)
    assert stats["staging_bytes"] == staging.total_bytes
    assert stats["budget_bytes"] == expert_bytes // 4 + staging.total_bytes
    assert stats["slot_bytes"] + stats["staging_bytes"] <= stats["budget_bytes"]
    # the ledger: the slots are held, the staging was used, and nothing ever went past the budget
    assert stats["held_by_kind"]["slots"] == stats["slot_bytes"]
    assert 0 < stats["peak_by_kind"]["read_buffer"] <= staging.read_buffer_bytes
    assert stats["peak_by_kind"]["convert"] == staging.convert_bytes
    assert stats["held_bytes"] <= stats["peak_held_bytes"] <= stats["budget_bytes"]
    # loads write their slot: vLLM's CPU prepack straight into it, no fresh tensor per load (and the
    # tokens above equal stock's, so the direct prepack gives vLLM's bytes)
    assert len(stats["conversion"]) == 1 and stats["conversion"][0].startswith("prepacked into the slots"), stats
    # at least half of the 75% that is offloaded must really be gone from anonymous memory
    assert saved_kib * 1024 > 0.5 * 0.75 * expert_bytes, report
