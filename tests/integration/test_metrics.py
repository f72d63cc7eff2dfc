"""What an operator sees of offload: the Prometheus families and the startup plan block.

One in-process engine run per policy gives real worker stats and a real
startup log; the scrape of a live server is in test_server.py.
"""

from __future__ import annotations

import re

import pytest

from tests.conftest import PROMPTS, run_engines

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def runs(tiny_models, tmp_path_factory) -> dict:
    model = str(tiny_models["mixtral"])
    jobs = [
        {"name": policy, "model": model, "prompts": PROMPTS, "max_tokens": 8,
         "engine": {"additional_config": {"moe_offload": {"policy": policy, "budget": budget, **extra}}}}
        # fate at 75%, asked to keep layer 0 whole (from disk it keeps none unless asked or profiled):
        # 8 slots, and 4 for layer 1, its predicted layer's minimum
        for policy, budget, extra in (("lru", "50%", {}), ("fate", "75%", {"resident_layers": 1}))
    ]
    results = run_engines(tmp_path_factory.mktemp("metrics"), jobs, stock=False)
    for result in results.values():
        assert "error" not in result, result["error"]
    return results


def _exposition(per_worker: list[dict]) -> dict[tuple[str, tuple], float]:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families
    from prometheus_client.registry import Collector

    from vllm_moe_offload.integration.metrics import families

    class Fixed(Collector):
        def collect(self):
            return families(per_worker, "tiny")

    registry = CollectorRegistry()
    registry.register(Fixed())
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _sum(samples, name, **labels) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and labels.items() <= dict(ls).items())


def test_families_carry_the_workers_counters(runs):
    stats = runs["lru"]["stats"]
    total = stats[0]["total"]
    samples = _exposition(stats)
    assert total["hits"] + total["misses"] > 0
    assert _sum(samples, "vllm:moe_offload_hits_total") == total["hits"]
    assert _sum(samples, "vllm:moe_offload_misses_total") == total["misses"]
    assert _sum(samples, "vllm:moe_offload_prefetch_hits_total") == total["prefetch_hits"]
    assert _sum(samples, "vllm:moe_offload_loads_total") == total["loads"]
    assert _sum(samples, "vllm:moe_offload_stall_seconds_total") == pytest.approx(total["stall_s"])
    assert _sum(samples, "vllm:moe_offload_kernel_seconds_total") == pytest.approx(total["kernel_s"])
    assert 0 < total["kernel_s"] and total["kernel_s"] + total["stall_s"] <= total["op_s"]  # both inside the op
    assert _sum(samples, "vllm:moe_offload_read_seconds_total") == pytest.approx(total["read_s"]) and total["read_s"] > 0
    assert _sum(samples, "vllm:moe_offload_bytes_read_total", tier="disk") == total["bytes_read"]["disk"] > 0
    assert _sum(samples, "vllm:moe_offload_resident_experts") == total["resident"]
    assert _sum(samples, "vllm:moe_offload_budget_bytes") == stats[0]["budget_bytes"]
    assert _sum(samples, "vllm:moe_offload_slot_bytes") == stats[0]["slot_bytes"]
    assert _sum(samples, "vllm:moe_offload_staging_bytes") == stats[0]["staging_bytes"] > 0
    assert 0 < _sum(samples, "vllm:moe_offload_peak_held_bytes") <= stats[0]["budget_bytes"]
    layer0 = stats[0]["layers"][0]
    assert _sum(samples, "vllm:moe_offload_hits_total", layer=str(layer0["layer_idx"]), rank="0") == layer0["hits"]
    assert _sum(samples, "vllm:moe_offload_slots", layer=str(layer0["layer_idx"])) == layer0["num_slots"]
    info = [dict(ls) for (n, ls), _ in samples.items() if n == "vllm:moe_offload_info"]
    assert info == [{"model_name": "tiny", "rank": "0", "policy": "lru", "tier": "disk", "num_experts": "8",
                     "resident_layers": "0", "predicted_layers": "0"}]


def test_inactive_workers_export_nothing():
    assert _exposition([{}]) == {}


def test_async_engine_is_watched_only_through_the_patch():
    import vllm_moe_offload
    from vllm.v1.engine.async_llm import AsyncLLM

    from vllm_moe_offload.patches import is_patched

    vllm_moe_offload.register()
    assert is_patched(AsyncLLM, "__init__")


def _plan_block(log: str, policy: str) -> str:
    """The startup block of ``policy`` without vLLM's per-line prefix (``... [startup_plan.py:N] ``)."""
    lines = [line.split("] ", 1)[1] for line in log.splitlines() if "[startup_plan.py:" in line]
    start = next(i for i, line in enumerate(lines) if line.startswith(f"MoE offload ready in ") and
                 f"policy {policy}," in line)
    end = next((i for i in range(start + 1, len(lines)) if not lines[i].startswith("  ")), len(lines))
    return "\n".join(lines[start:end])


def test_startup_plan_block(runs):
    log = open(runs["lru"]["log"]).read()
    lru = _plan_block(log, "lru")
    assert "  resident   none\n" in lru
    assert "  offloaded  layers 0-1: 4/8 slots\n" in lru
    assert "  cache      lru replacement\n" in lru
    assert re.search(r"  where      slots on cpu; offloaded experts read from /\S+ \(direct I/O\)", lru), lru
    assert re.search(r"  budget     2.25 MiB; slots use 1.50 MiB; staging 772.00 KiB; all experts 3.00 MiB", lru), lru
    assert re.search(r"  link       measured [\d.]+ KiB \(one expert, disk -> cpu\) in [\d.]+ ms = [\d.]+ GB/s", lru)
    assert "  hit rate   expected: unknown" in lru
    # loads from the checkpoint convert: the block names the store that reads experts ready
    assert re.search(r"  store      each load converts its expert from the checkpoint; --moe-offload-store kernel "
                     r"writes the experts once in the kernel layout \(3.00 MiB of disk", lru), lru
    assert "prefetched from the previous layer's router" not in lru  # fate's routers
    # the next-layer fill (layer_ahead.py), on for every policy: layer 0 loads layer 1's first experts ahead
    assert "  prediction prefills and batches: 1 layer loads the next one's first experts while they compute" in lru
    fate = _plan_block(log, "fate")
    assert "  resident   layer 0 (every expert in fast memory)\n" in fate, fate
    assert "  offloaded  layer 1: 4/8 slots\n" in fate, fate
    assert "  cache      arc replacement\n" in fate, fate  # fate's own cache unless `replacement` says otherwise
    assert re.search(r"  prediction 1 layers prefetched", fate), fate
