"""Checkpoints that stack every expert in one tensor per projection: offloaded, tokens identical to stock.

Gemma-4 stores ``experts.gate_up_proj`` [E, 2I, H] and ``experts.down_proj`` [E, H, I]; Llama-4 the same
transposed, [E, H, 2I] and [E, I, H] (tests/integration/fused_models.py makes both in the released names).
vLLM's loader must skip those tensors before reading them, and the disk tier reads one expert's
contiguous slice of each, turning the transposed ones. Real engines, greedy tokens against stock vLLM on
the same checkpoint at 100%, 50% and the minimum budget (top_k slots per layer), plus the host tier and
the kernel-layout store (which keeps the turned experts) at 50%.
"""

from __future__ import annotations

import math

import pytest

from tests.conftest import offload_job, run_engines
from tests.integration.fused_models import NUM_EXPERTS, STACKED, TOP_K, make_fused_model
from vllm_moe_offload.core.config import format_bytes

pytestmark = pytest.mark.engine

ARCHS = ["gemma4", "llama4"]
#: budget label -> (budget, slots per layer); the minimum is top_k of 8 experts
BUDGETS = {
    arch: {"100%": ("100%", NUM_EXPERTS), "50%": ("50%", NUM_EXPERTS // 2), "min": (f"{100 * k / NUM_EXPERTS}%", k)}
    for arch, k in TOP_K.items()
}
#: other paths at 50%: the host tier (converted once at start-up) and the kernel store (turned once, kept)
EXTRA = {"host": {"tier": "host"}, "kernel-store": {"store": "kernel"}}


def _cases() -> list[str]:
    return [f"{arch}/{label}" for arch in ARCHS for label in [*BUDGETS[arch], *EXTRA]]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("fused")
    models = {arch: make_fused_model(arch, root / "models" / arch) for arch in ARCHS}
    stock = run_engines(root / "stock", [offload_job(f"{a}/stock", m) for a, m in models.items()], stock=True)
    jobs = [
        offload_job(f"{arch}/{label}", models[arch], policy="lru", budget=budget)
        for arch in ARCHS for label, (budget, _) in BUDGETS[arch].items()
    ] + [
        offload_job(f"{arch}/{label}", models[arch], policy="lru", budget="50%", cache_dir=str(root / "stores"),
                    **extra)
        for arch in ARCHS for label, extra in EXTRA.items()
    ]
    return stock, run_engines(root / "offload", jobs, stock=False)


@pytest.mark.parametrize("name", _cases())
def test_tokens_identical_to_stock(results, name):
    stock, offload = results
    got = offload[name]
    assert "error" not in got, got.get("error")
    assert got["tokens"] == stock[f"{name.split('/')[0]}/stock"]["tokens"]


@pytest.mark.parametrize("name", _cases())
def test_slots_hold_the_budget_and_loads_read_single_experts(results, name):
    _, offload = results
    arch, label = name.split("/")
    stats = offload[name]["stats"][0]
    slots = BUDGETS[arch][label][1] if label in BUDGETS[arch] else NUM_EXPERTS // 2
    assert stats["layer_slots"] == [slots, slots]
    total = stats["total"]
    if label == "100%":
        assert total["misses"] == 0 and total["loads"] == 2 * NUM_EXPERTS
    else:
        assert total["misses"] > 0
    if label not in EXTRA:  # the checkpoint tier: a load reads one expert's slice of each tensor, never more
        per_expert = sum(math.prod(shape[1:]) * 2 for shape in STACKED[arch].values())  # bf16
        aligned = per_expert + len(STACKED[arch]) * 2 * 4096  # each read widened to 4 KiB pages for O_DIRECT
        assert per_expert <= total["bytes_read"]["disk"] / total["loads"] <= aligned


@pytest.mark.parametrize("arch", ARCHS)
def test_the_loader_skips_the_stacked_tensors(results, arch):
    _, offload = results
    log = open(offload[f"{arch}/50%"]["log"]).read()
    # 2 MoE layers x (gate_up_proj, down_proj), never read by vLLM's loader
    skipped = 2 * sum(math.prod(shape) * 2 for shape in STACKED[arch].values())
    line = (f"vLLM's loader skips 4 checkpoint tensors ({format_bytes(skipped)}) holding the experts of 2 MoE "
            "layers, each stacked in one tensor per projection")
    assert line in log
    turned = "transposed, " if arch == "llama4" else ""
    layer = {"gemma4": "model.layers.0.experts", "llama4": "model.layers.0.feed_forward.experts"}[arch]
    read = (f"layer {layer} reads its experts from gate_up_proj (stacked, {turned}first half), "
            f"gate_up_proj (stacked, {turned}second half), down_proj (stacked{', transposed' if turned else ''})")
    assert log.count(read) == len(BUDGETS[arch]) + len(EXTRA)  # once per engine of this model
