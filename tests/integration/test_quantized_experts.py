"""Quantized checkpoints: FP8 block-128, AWQ / GPTQ / compressed-tensors W4A16 int4 and compressed-tensors W8A8
int8 experts offloaded through vLLM's own code, tokens identical to stock.

The tiny Qwen3-MoEs of tests/integration/quantized_models.py store their experts as the FP8 releases do
(``float8_e4m3fn`` weights, ``weight_scale_inv`` per 128x128 block) and as the AWQ releases do (int32
``qweight`` / ``qzeros`` with eight 4-bit values each, float16 ``scales`` per group of 128). Stock vLLM runs
them with its CPU FP8 backend and its CPU int4 backend (``CPUExpertsInt4``); offloaded, each load fills a
one-expert holder from the quant method's own ``create_weights`` through vLLM's ``weight_loader`` and packs
it with vLLM's per-expert conversion, and the slot pools hold weights and scales (and AWQ's zero points).
Real engines, greedy tokens against stock vLLM on the same checkpoint at 100%, 50% and the minimum budget
(top_k slots per layer), plus the host tier (FP8) and the kernel-layout store at 50%. The compressed-tensors
W4A16 checkpoint (llm-compressor's pack-quantized ``weight_packed`` / ``weight_scale`` / ``weight_shape``) is
made by compressed-tensors' own W4A16 scheme and compressor; vLLM's CPU conversion makes its zero points, which
the slots hold too. The compressed-tensors W8A8 int8 checkpoint (int8 ``weight``, per-channel ``weight_scale``,
dynamic per-token activations) is made the same way and runs on vLLM's ``CPUExpertsInt8``. In the same
runner: the formats offload does not hold are refused while the layer is built, naming the format and what
is supported (FP8 quantized at load, AWQ without zero points), GPTQ with ``desc_act`` and asymmetric W4A16
get vLLM's own refusals, and the plugin's own ``quant`` is refused on an already quantized checkpoint (FP8
and AWQ).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from tests.conftest import offload_job, run_engines
from tests.integration.quantized_models import (
    HIDDEN, MOE_INTERMEDIATE, NUM_EXPERTS, TOP_K, make_awq_model, make_fp8_model, make_gptq_model, make_w4a16_model,
    make_w8a8_model,
)
from vllm_moe_offload.cli.tiny_models import make_tiny_model
from vllm_moe_offload.integration.cpu_kernel import VIA_VLLM
from vllm_moe_offload.integration.quantized_experts import SUPPORTED
from vllm_moe_offload.runtime.amx import cpu_reports_amx

pytestmark = [
    pytest.mark.engine,
    # stock vLLM runs FP8 block and int4 experts on the CPU with CPUExpertsFp8 / CPUExpertsInt4 only, AMX kernels
    pytest.mark.skipif(not cpu_reports_amx(), reason="vLLM's CPU FP8 and int4 MoE backends need AMX (amx_tile)"),
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
#: AWQ at 50%, the minimum and 100%, and the kernel store at 50%
AWQ_CASES = ["100%", "50%", "min", "kernel-store"]
#: GPTQ: the same conversion after a transpose; 50% and the minimum
GPTQ_CASES = ["50%", "min"]
#: one expert of the AWQ or GPTQ checkpoint: qweight, half a byte a value; float16 scales and int32 qzeros (eight
#: values each) per group of 128 inputs: gate, up [H/128, I] and down [I/128, H]
INT4_GROUPS = HIDDEN * MOE_INTERMEDIATE // 128  # per projection: groups x outputs
INT4_CHECKPOINT_BYTES = 3 * (MOE_INTERMEDIATE * HIDDEN // 2 + 2 * INT4_GROUPS + 4 * INT4_GROUPS // 8)
#: compressed-tensors W4A16: 100%, 50%, the minimum and the kernel store at 50%
W4A16_CASES = ["100%", "50%", "min", "kernel-store"]
#: one expert of the W4A16 checkpoint: weight_packed, half a byte a value; bfloat16 weight_scale per group of 128
#: inputs; no zero points (symmetric)
W4A16_CHECKPOINT_BYTES = 3 * (MOE_INTERMEDIATE * HIDDEN // 2 + 2 * INT4_GROUPS)
CHECKPOINT_BYTES = {"awq": INT4_CHECKPOINT_BYTES, "gptq": INT4_CHECKPOINT_BYTES, "w4a16": W4A16_CHECKPOINT_BYTES}
#: what a load reads besides: W4A16's three int64 weight_shape [2] are read with the expert's tensors (vLLM's
#: loader takes them, the offloaded layer drops them)
READ_BETWEEN = {"awq": 0, "gptq": 0, "w4a16": 3 * 2 * 8}
#: separate reads per load: compressed-tensors writes its tensors grouped by dtype (every expert's weight_shape,
#: then every weight_packed, then every weight_scale), so a W4A16 expert lies in three runs of the file, each
#: read widened to 4 KiB pages
READS = {"awq": 1, "gptq": 1, "w4a16": 3}
#: compressed-tensors W8A8 int8: 100%, 50% and the minimum
W8A8_CASES = ["100%", "50%", "min"]
#: one expert of the W8A8 checkpoint: int8 weights, a bfloat16 scale per output channel
W8A8_CHECKPOINT_BYTES = 3 * MOE_INTERMEDIATE * HIDDEN + 2 * (2 * MOE_INTERMEDIATE + HIDDEN)
#: in slots: the int8 weights VNNI-prepacked by vLLM's CPU kernel (``convert_weight_packed`` adds 4 bytes, an
#: int32, to each output row: w13 [2I, H + 4], w2 [H, I + 4]), and float32 scales
W8A8_SLOT_BYTES = 3 * MOE_INTERMEDIATE * HIDDEN + 2 * 4 * (2 * MOE_INTERMEDIATE + HIDDEN)
#: the same expert in bf16
BF16_EXPERT_BYTES = 3 * MOE_INTERMEDIATE * HIDDEN * 2


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized")
    fp8 = make_fp8_model(root / "models" / "fp8")
    awq = make_awq_model(root / "models" / "awq")
    gptq = make_gptq_model(root / "models" / "gptq")
    w4a16 = make_w4a16_model(root / "models" / "w4a16")
    w8a8 = make_w8a8_model(root / "models" / "w8a8")
    w4a16_asym = make_w4a16_model(root / "models" / "w4a16-asym", preset="W4A16_ASYM")
    bf16 = make_tiny_model("qwen3_moe", root / "models" / "bf16")
    # the refused variants: their config only (the layer is refused before any tensor is read)
    awq_no_zero_point = _variant(awq, root / "models" / "awq-no-zero-point", zero_point=False)
    gptq_desc_act = _variant(gptq, root / "models" / "gptq-desc-act", desc_act=True)
    stock = run_engines(root / "stock", [offload_job(f"{name}/stock", model) for name, model in
                                         (("fp8", fp8), ("awq", awq), ("gptq", gptq), ("w4a16", w4a16),
                                          ("w8a8", w8a8))], stock=True)
    online = offload_job("refused/online-fp8", bf16, policy="lru", budget="50%")
    online["engine"]["quantization"] = "fp8"  # FP8 quantized by vLLM at load: per-tensor scales
    jobs = [
        *(offload_job(f"fp8/{label}", fp8, policy="lru", budget=budget) for label, (budget, _) in BUDGETS.items()),
        *(offload_job(f"fp8/{label}", fp8, policy="lru", budget="50%", cache_dir=str(root / "stores"), **extra)
          for label, extra in EXTRA.items()),
        *(offload_job(f"awq/{label}", awq, policy="lru", budget=BUDGETS[label][0]) for label in AWQ_CASES[:3]),
        offload_job("awq/kernel-store", awq, policy="lru", budget="50%", cache_dir=str(root / "awq-stores"),
                    store="kernel"),
        *(offload_job(f"gptq/{label}", gptq, policy="lru", budget=BUDGETS[label][0]) for label in GPTQ_CASES),
        # a size budget the user's process must plan in int4 bytes (in bf16 ones it is below the minimum)
        offload_job("awq/1MiB", awq, policy="lru", budget="1MiB"),
        *(offload_job(f"w4a16/{label}", w4a16, policy="lru", budget=BUDGETS[label][0]) for label in W4A16_CASES[:3]),
        offload_job("w4a16/kernel-store", w4a16, policy="lru", budget="50%", cache_dir=str(root / "w4a16-stores"),
                    store="kernel"),
        *(offload_job(f"w8a8/{label}", w8a8, policy="lru", budget=BUDGETS[label][0]) for label in W8A8_CASES),
        offload_job("refused/awq-no-zero-point", awq_no_zero_point, policy="lru", budget="50%"),
        offload_job("refused/gptq-desc-act", gptq_desc_act, policy="lru", budget="50%"),
        offload_job("refused/w4a16-asym", w4a16_asym, policy="lru", budget="50%"),
        offload_job("refused/quant-int4", fp8, policy="lru", budget="50%", quant="int4"),
        offload_job("refused/awq-quant-int4", awq, policy="lru", budget="50%", quant="int4"),
        online,
    ]
    return root, stock, run_engines(root / "offload", jobs, stock=False)


def _variant(model: Path, folder: Path, **changes) -> Path:
    """A copy of ``model`` whose ``quantization_config`` has ``changes``."""
    shutil.copytree(model, folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"].update(changes)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


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
    assert stats["kernel"] == [VIA_VLLM]  # vLLM's FP8 kernel, through its own machinery
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


@pytest.mark.parametrize(
    "job, fmt, quant", [("quant-int4", "fp8-block", "fp8"), ("awq-quant-int4", "awq-int4", "auto_awq")],
)
def test_the_plugins_own_quantization_is_refused_on_a_quantized_checkpoint(results, job, fmt, quant):
    _, _, offload = results
    assert offload[f"refused/{job}"]["error"] == (
        f"OffloadConfigError: quant 'int4' quantizes bf16/fp16 experts, but model.layers.0.mlp.experts holds "
        f"{fmt} experts (quantization {quant!r}) already quantized by the checkpoint; allowed: quant 'none' with a "
        "quantized checkpoint, or quant 'int4' / 'int4+int2' with an unquantized one"
    )


def test_a_format_offload_does_not_hold_is_refused_naming_it_and_what_is_supported(results):
    _, _, offload = results
    assert offload["refused/online-fp8"]["error"] == (
        "NotImplementedError: model.layers.0.mlp.experts: MoE offload cannot hold this layer's experts: "
        "Fp8PerTensorOnlineMoEMethod (quantization 'online')"
        f". It supports {SUPPORTED}. Run without --moe-offload, or with a checkpoint in a supported format."
    )


def test_awq_without_zero_points_is_refused_naming_it(results):
    _, _, offload = results
    assert offload["refused/awq-no-zero-point"]["error"] == (
        "NotImplementedError: model.layers.0.mlp.experts: MoE offload cannot hold this layer's experts: "
        "AWQ int4 experts without zero points (zero_point false)"
        f". It supports {SUPPORTED}. Run without --moe-offload, or with a checkpoint in a supported format."
    )


def test_gptq_with_desc_act_gets_vllms_own_refusal(results):
    # vLLM 0.32 refuses it while validating the config, before any layer (or the plugin) sees it
    _, _, offload = results
    error = offload["refused/gptq-desc-act"]["error"]
    assert error.startswith("ValidationError: 1 validation error for VllmConfig")
    assert "GPTQ group activation ordering (desc_act=True) is no longer supported" in error


def test_asymmetric_w4a16_gets_vllms_own_refusal(results):
    # vLLM 0.32's CPU int4 kernel takes symmetric compressed-tensors W4A16 only: no backend is selected while the
    # layer's quant method is built, before the plugin sees the layer
    _, _, offload = results
    assert offload["refused/w4a16-asym"]["error"] == (
        "NotImplementedError: No WNA16 MoE backend supports the deployment configuration."
    )


INT4_LABELS = [
    *(f"awq/{c}" for c in AWQ_CASES), *(f"gptq/{c}" for c in GPTQ_CASES), *(f"w4a16/{c}" for c in W4A16_CASES),
]


@pytest.mark.parametrize("label", [*INT4_LABELS, "awq/1MiB"])
def test_int4_tokens_identical_to_stock(results, label):
    _, stock, offload = results
    got = offload[label]
    assert "error" not in got, got.get("error")
    assert got["tokens"] == stock[label.split("/")[0] + "/stock"]["tokens"]


@pytest.mark.parametrize("label", INT4_LABELS)
def test_int4_slots_hold_packed_weights_scales_and_zero_points_and_loads_read_single_experts(results, label):
    _, _, offload = results
    stats = offload[label]["stats"][0]
    fmt, label = label.split("/")
    checkpoint_bytes = CHECKPOINT_BYTES[fmt]
    slots = BUDGETS[label][1] if label in BUDGETS else NUM_EXPERTS // 2
    assert stats["layer_slots"] == [slots, slots]
    # CPUExpertsInt4's blocks of the six tensors: about the checkpoint's bytes, under a third of bf16's (AWQ and
    # GPTQ store as many bytes: the same values packed along another axis; W4A16's zero points are made by vLLM)
    assert checkpoint_bytes <= stats["expert_bytes"] < 0.3 * BF16_EXPERT_BYTES
    total = stats["total"]
    assert total["slot_bytes"] == 2 * slots * stats["expert_bytes"]
    if label == "100%":
        assert total["misses"] == 0 and total["loads"] == 2 * NUM_EXPERTS
    else:
        assert total["misses"] > 0
    tier = "kernel" if label == "kernel-store" else "disk"
    assert set(total["bytes_read"]) == {tier}
    per_load = total["bytes_read"][tier] / total["loads"]
    if tier == "disk":  # one expert's six or nine tensors, in READS runs of the file: each widened to 4 KiB pages
        assert checkpoint_bytes <= per_load <= checkpoint_bytes + READ_BETWEEN[fmt] + READS[fmt] * 2 * 4096


def test_the_loader_skips_awq_weights_scales_and_zero_points(results):
    _, _, offload = results
    log = Path(offload["awq/50%"]["log"]).read_text()
    # 2 MoE layers x 8 experts x 3 projections x (qweight, qzeros, scales), never read by vLLM's loader
    assert "vLLM's loader skips 144 checkpoint tensors" in log
    assert ("layer model.layers.0.mlp.experts reads its experts from gate_proj, up_proj, down_proj, each with "
            "its qzeros, scales") in log


def test_the_loader_skips_w4a16_packed_weights_and_scales(results):
    _, _, offload = results
    log = Path(offload["w4a16/50%"]["log"]).read_text()
    # 2 MoE layers x 8 experts x 3 projections x (weight_packed, weight_scale); weight_shape goes to vLLM's
    # loader, which the offloaded layer drops
    assert "vLLM's loader skips 96 checkpoint tensors" in log
    assert ("layer model.layers.0.mlp.experts reads its experts from gate_proj, up_proj, down_proj, each with "
            "its weight_scale") in log


@pytest.mark.parametrize("stores", ["awq-stores", "w4a16-stores"])
def test_int4_kernel_store_holds_the_packed_experts_with_scales_and_zero_points(results, stores):
    root, _, _ = results
    (store,) = (root / stores).iterdir()
    kernel = json.loads((store / "manifest.json").read_text())["precisions"]["kernel"]
    assert kernel["experts"].endswith("CPUExpertsInt4")
    # vLLM's AMX blocks: int4 weights in bytes, then w13 / w2 scales (float32) and zero points (int8)
    assert kernel["w13"]["dtype"] == kernel["w2"]["dtype"] == "torch.uint8"
    assert [e["dtype"] for e in kernel["extra"]] == ["torch.float32"] * 2 + ["torch.int8"] * 2


@pytest.mark.parametrize("label", W8A8_CASES)
def test_int8_tokens_identical_to_stock(results, label):
    _, stock, offload = results
    got = offload[f"w8a8/{label}"]
    assert "error" not in got, got.get("error")
    assert got["tokens"] == stock["w8a8/stock"]["tokens"]


@pytest.mark.parametrize("label", W8A8_CASES)
def test_int8_slots_hold_prepacked_weights_and_scales_and_loads_read_single_experts(results, label):
    _, _, offload = results
    stats = offload[f"w8a8/{label}"]["stats"][0]
    slots = BUDGETS[label][1]
    assert stats["layer_slots"] == [slots, slots]
    assert stats["expert_bytes"] == W8A8_SLOT_BYTES  # about half of bf16's
    total = stats["total"]
    assert total["slot_bytes"] == 2 * slots * W8A8_SLOT_BYTES
    if label == "100%":
        assert total["misses"] == 0 and total["loads"] == 2 * NUM_EXPERTS
    else:
        assert total["misses"] > 0
    assert set(total["bytes_read"]) == {"disk"}
    per_load = total["bytes_read"]["disk"] / total["loads"]
    # two reads, each widened to 4 KiB pages: safetensors writes the bfloat16 scales apart from the int8 weights
    assert W8A8_CHECKPOINT_BYTES <= per_load <= W8A8_CHECKPOINT_BYTES + 2 * 2 * 4096
    assert per_load < 0.6 * BF16_EXPERT_BYTES
