"""Quantized checkpoints: FP8 block-128 experts offloaded through vLLM's own code, tokens identical to stock.

The tiny Qwen3-MoE of tests/integration/quantized_models.py stores its experts as the FP8 releases do
(``float8_e4m3fn`` weights, ``weight_scale_inv`` per 128x128 block). Stock vLLM runs them with its CPU FP8
backend; offloaded, each load fills a one-expert holder from the quant method's own ``create_weights``
through vLLM's ``weight_loader`` and packs it with vLLM's per-expert conversion, and the slot pools hold
weights and scales. Real engines, greedy tokens against stock vLLM on the same checkpoint at 100%, 50%
and the minimum budget (top_k slots per layer), plus the host tier and the kernel-layout store at 50%.
In the same runner: the formats offload does not hold are refused while the layer is built, naming the
format and what is supported, and the plugin's own ``quant`` is refused on an already quantized checkpoint.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.conftest import offload_job, run_engines
from tests.integration.quantized_models import HIDDEN, MOE_INTERMEDIATE, NUM_EXPERTS, TOP_K, make_fp8_model
from vllm_moe_offload.cli.tiny_models import make_tiny_model
from vllm_moe_offload.integration.quantized_experts import SUPPORTED
from vllm_moe_offload.runtime.amx import cpu_reports_amx

pytestmark = [
    pytest.mark.engine,
    # stock vLLM runs FP8 block experts on the CPU with CPUExpertsFp8 only, an AMX kernel
    pytest.mark.skipif(not cpu_reports_amx(), reason="vLLM's CPU FP8 MoE backend needs AMX (amx_tile)"),
]

#: budget label -> (budget, slots per layer). 1 MiB: 3 slots of FP8 experts (98328 bytes with scales) after
#: the staging; the user's process must plan it in FP8 bytes too (in bf16 ones it is below the minimum)
BUDGETS = {"100%": ("100%", NUM_EXPERTS), "50%": ("50%", NUM_EXPERTS // 2),
           "min": (f"{100 * TOP_K / NUM_EXPERTS}%", TOP_K), "1MiB": ("1MiB", 3)}
#: other paths at 50%: the host tier (packed once at start-up) and the kernel store (packed once, kept)
EXTRA = {"host": {"tier": "host"}, "kernel-store": {"store": "kernel"}}
CASES = [*BUDGETS, *EXTRA]
#: one expert's FP8 weights: gate, up [I, H] and down [H, I], one byte a value
FP8_EXPERT_BYTES = 3 * MOE_INTERMEDIATE * HIDDEN
#: its block scales, float32: gate, up [I/128, H/128] and down [H/128, I/128]
SCALE_BYTES = 3 * 4 * (MOE_INTERMEDIATE // 128) * (HIDDEN // 128)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized")
    fp8 = make_fp8_model(root / "models" / "fp8")
    bf16 = make_tiny_model("qwen3_moe", root / "models" / "bf16")
    stock = run_engines(root / "stock", [offload_job("fp8/stock", fp8)], stock=True)
    online = offload_job("refused/online-fp8", bf16, policy="lru", budget="50%")
    online["engine"]["quantization"] = "fp8"  # FP8 quantized by vLLM at load: per-tensor scales
    jobs = [
        *(offload_job(f"fp8/{label}", fp8, policy="lru", budget=budget) for label, (budget, _) in BUDGETS.items()),
        *(offload_job(f"fp8/{label}", fp8, policy="lru", budget="50%", cache_dir=str(root / "stores"), **extra)
          for label, extra in EXTRA.items()),
        offload_job("refused/quant-int4", fp8, policy="lru", budget="50%", quant="int4"),
        online,
    ]
    return root, stock, run_engines(root / "offload", jobs, stock=False)


@pytest.mark.parametrize("label", CASES)
def test_tokens_identical_to_stock(results, label):
    _, stock, offload = results
    got = offload[f"fp8/{label}"]
    assert "error" not in got, got.get("error")
    assert got["tokens"] == stock["fp8/stock"]["tokens"]


@pytest.mark.parametrize("label", CASES)
def test_slots_hold_weights_and_scales_and_loads_read_single_fp8_experts(results, label):
    _, _, offload = results
    stats = offload[f"fp8/{label}"]["stats"][0]
    slots = BUDGETS[label][1] if label in BUDGETS else NUM_EXPERTS // 2
    assert stats["layer_slots"] == [slots, slots]
    assert stats["expert_bytes"] == FP8_EXPERT_BYTES + SCALE_BYTES  # the packed weights keep their size
    total = stats["total"]
    assert total["slot_bytes"] == 2 * slots * (FP8_EXPERT_BYTES + SCALE_BYTES)
    if label == "100%":
        assert total["misses"] == 0 and total["loads"] == 2 * NUM_EXPERTS
    else:
        assert total["misses"] > 0
    tier = {"host": "host", "kernel-store": "kernel"}.get(label, "disk")
    assert set(total["bytes_read"]) == {tier}
    per_load = total["bytes_read"][tier] / total["loads"]
    if tier == "disk":  # one expert's six tensors, adjacent in the file: one read widened to 4 KiB pages
        assert FP8_EXPERT_BYTES + SCALE_BYTES <= per_load <= FP8_EXPERT_BYTES + SCALE_BYTES + 2 * 4096
        assert per_load < 0.6 * 2 * FP8_EXPERT_BYTES  # about half the bytes of the same expert in bf16


def test_the_loader_skips_weights_and_scales(results):
    _, _, offload = results
    log = Path(offload["fp8/50%"]["log"]).read_text()
    # 2 MoE layers x 8 experts x 3 projections x (weight, weight_scale_inv), never read by vLLM's loader
    assert "vLLM's loader skips 96 checkpoint tensors" in log
    assert ("layer model.layers.0.mlp.experts reads its experts from gate_proj, up_proj, down_proj, each with "
            "its weight_scale_inv") in log


def test_kernel_store_holds_the_packed_experts_with_their_scales(results):
    root, _, _ = results
    (store,) = (root / "stores").iterdir()
    kernel = json.loads((store / "manifest.json").read_text())["precisions"]["kernel"]
    assert kernel["experts"].endswith("CPUExpertsFp8")
    assert kernel["w13"] == {"shape": [2 * MOE_INTERMEDIATE, HIDDEN], "dtype": "torch.float8_e4m3fn"}
    assert [e["shape"] for e in kernel["extra"]] == [
        [2 * MOE_INTERMEDIATE // 128, HIDDEN // 128], [HIDDEN // 128, MOE_INTERMEDIATE // 128],
    ]
    aligned = math.ceil(2 * MOE_INTERMEDIATE * HIDDEN / 4096) * 4096
    assert kernel["w2_offset"] == aligned


def test_the_plugins_own_quantization_is_refused_on_a_quantized_checkpoint(results):
    _, _, offload = results
    assert offload["refused/quant-int4"]["error"] == (
        "OffloadConfigError: quant 'int4' quantizes bf16/fp16 experts, but model.layers.0.mlp.experts holds "
        "fp8-block experts (quantization 'fp8') already quantized by the checkpoint; allowed: quant 'none' with a "
        "quantized checkpoint, or quant 'int4' / 'int4+int2' with an unquantized one"
    )


def test_a_format_offload_does_not_hold_is_refused_naming_it_and_what_is_supported(results):
    _, _, offload = results
    assert offload["refused/online-fp8"]["error"] == (
        "NotImplementedError: model.layers.0.mlp.experts: MoE offload cannot hold this layer's experts: "
        "Fp8PerTensorOnlineMoEMethod (quantization 'online')"
        f". It supports {SUPPORTED}. Run without --moe-offload, or with a checkpoint in a supported format."
    )
