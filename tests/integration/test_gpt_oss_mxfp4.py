"""gpt-oss with MXFP4 experts and expert biases, offloaded through its own class and loader, tokens identical
to stock.

The tiny gpt-oss of tests/integration/quantized_models.py stores its experts as openai/gpt-oss-20b does
(stacked ``gate_up_proj_blocks`` / ``_scales`` / ``_bias`` and ``down_proj_*``, quant_method ``mxfp4``). vLLM
builds its MoE layers as ``GptOssRoutedExperts`` (its own weight loader) and runs them on its CPU MXFP4 backend
(``CPUExpertsMxfp4``). Offloaded, each load reads one expert's slice of the six stacked tensors, fills a
one-expert holder through ``GptOssRoutedExperts.weight_loader`` and packs it with vLLM's CPU conversion; the
slots hold packed weights, scales and both biases. Real engines, greedy tokens against stock vLLM on the same
checkpoint at 100%, 50% and the minimum budget, and the kernel store at 50%. The same checkpoint with its
expert biases zeroed gives other tokens in stock vLLM, so the equality shows the biases reach the kernel from
the slots.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import offload_job, run_engines
from tests.integration.quantized_models import NUM_EXPERTS, TOP_K, make_gpt_oss_mxfp4_model
from vllm_moe_offload.runtime.amx import cpu_reports_amx

pytestmark = [
    pytest.mark.engine,
    pytest.mark.skipif(not cpu_reports_amx(), reason="vLLM's CPU MXFP4 MoE backend needs AMX (amx_tile)"),
]

#: label -> (budget, slots per layer)
BUDGETS = {
    "100%": ("100%", NUM_EXPERTS), "50%": ("50%", NUM_EXPERTS // 2), "min": (f"{100 * TOP_K / NUM_EXPERTS}%", TOP_K),
}
CASES = [*BUDGETS, "kernel-store"]
HIDDEN, INTERMEDIATE = 128, 64
#: one expert in the checkpoint: MXFP4 weights half a byte a value, a uint8 scale per 32 inputs, bf16 biases
CHECKPOINT_BYTES = 3 * HIDDEN * INTERMEDIATE // 2 + 3 * HIDDEN * INTERMEDIATE // 32 + 2 * (2 * INTERMEDIATE + HIDDEN)
#: in slots: the same weights and scales (prepacked for AMX), the biases in float32
SLOT_BYTES = 3 * HIDDEN * INTERMEDIATE // 2 + 3 * HIDDEN * INTERMEDIATE // 32 + 4 * (2 * INTERMEDIATE + HIDDEN)
#: the same expert in bf16 (weights only)
BF16_EXPERT_BYTES = 3 * HIDDEN * INTERMEDIATE * 2
#: six stacked tensors: a load reads one slice of each, every slice widened to 4 KiB pages
STACKED_TENSORS = 6


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt-oss")
    model = make_gpt_oss_mxfp4_model(root / "models" / "gpt-oss")
    no_bias = _without_expert_biases(model, root / "models" / "gpt-oss-no-bias")
    stock = run_engines(root / "stock", [offload_job("stock", model), offload_job("stock-no-bias", no_bias)],
                        stock=True)
    jobs = [
        *(offload_job(label, model, policy="lru", budget=budget) for label, (budget, _) in BUDGETS.items()),
        offload_job("kernel-store", model, policy="lru", budget="50%", cache_dir=str(root / "stores"), store="kernel"),
        offload_job("refused/quant-int4", model, policy="lru", budget="50%", quant="int4"),
    ]
    return root, stock, run_engines(root / "offload", jobs, stock=False)


def _without_expert_biases(model: Path, folder: Path) -> Path:
    """A copy of ``model`` whose expert biases are zero."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(model, folder)
    path = folder / "model.safetensors"
    tensors = {n: torch.zeros_like(t) if n.endswith("_proj_bias") else t for n, t in load_file(str(path)).items()}
    save_file(tensors, str(path), metadata={"format": "pt"})
    return folder


def test_stock_vllm_runs_the_checkpoint_and_its_expert_biases_change_the_tokens(results):
    _, stock, _ = results
    assert "error" not in stock["stock"], stock["stock"].get("error")
    assert stock["stock"]["tokens"] != stock["stock-no-bias"]["tokens"]
    log = Path(stock["stock"]["log"]).read_text()
    assert "Using CPUExpertsMxfp4" in log


@pytest.mark.parametrize("label", CASES)
def test_tokens_identical_to_stock(results, label):
    _, stock, offload = results
    got = offload[label]
    assert "error" not in got, got.get("error")
    assert got["tokens"] == stock["stock"]["tokens"]


@pytest.mark.parametrize("label", CASES)
def test_slots_hold_packed_weights_scales_and_biases_and_loads_read_single_experts(results, label):
    _, _, offload = results
    stats = offload[label]["stats"][0]
    slots = BUDGETS[label][1] if label in BUDGETS else NUM_EXPERTS // 2
    assert stats["layer_slots"] == [slots, slots]
    assert stats["expert_bytes"] == SLOT_BYTES
    assert stats["expert_bytes"] < 0.3 * BF16_EXPERT_BYTES
    total = stats["total"]
    assert total["slot_bytes"] == 2 * slots * SLOT_BYTES
    if label == "100%":
        assert total["misses"] == 0 and total["loads"] == 2 * NUM_EXPERTS
    else:
        assert total["misses"] > 0
    tier = "kernel" if label == "kernel-store" else "disk"
    assert set(total["bytes_read"]) == {tier}
    per_load = total["bytes_read"][tier] / total["loads"]
    if tier == "disk":  # one expert's slice of each stacked tensor, each widened to 4 KiB pages
        assert CHECKPOINT_BYTES <= per_load <= CHECKPOINT_BYTES + STACKED_TENSORS * 2 * 4096


def test_the_loader_skips_the_stacked_blocks_scales_and_biases(results):
    _, _, offload = results
    log = Path(offload["50%"]["log"]).read_text()
    # 2 MoE layers x (gate_up, down) x (blocks, scales, bias), never read by vLLM's loader
    assert "vLLM's loader skips 12 checkpoint tensors" in log
    assert ("layer model.layers.0.mlp.experts reads its experts from gate_up_proj_blocks (stacked), down_proj_blocks "
            "(stacked), each with its down_proj_bias, down_proj_scales, gate_up_proj_bias, gate_up_proj_scales") in log
    assert "has no MoE layers" not in log


def test_kernel_store_holds_the_packed_experts_with_scales_and_biases(results):
    root, _, _ = results
    (store,) = (root / "stores").iterdir()
    kernel = json.loads((store / "manifest.json").read_text())["precisions"]["kernel"]
    assert kernel["experts"].endswith("CPUExpertsMxfp4")
    assert kernel["w13"]["dtype"] == kernel["w2"]["dtype"] == "torch.uint8"
    assert [e["dtype"] for e in kernel["extra"]] == ["torch.uint8"] * 2 + ["torch.float32"] * 2


def test_the_plugins_own_quantization_is_refused(results):
    _, _, offload = results
    assert offload["refused/quant-int4"]["error"] == (
        "OffloadConfigError: quant 'int4' quantizes bf16/fp16 experts, but model.layers.0.mlp.experts holds "
        "mxfp4 experts (quantization 'gpt_oss_mxfp4') already quantized by the checkpoint; allowed: quant 'none' "
        "with a quantized checkpoint, or quant 'int4' / 'int4+int2' with an unquantized one"
    )
