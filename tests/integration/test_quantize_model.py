"""``vllm-moe-offload quantize-model``, and offload on what it writes from the trained tiny Mixtral.

The quantized copies are Mixtral-layout checkpoints (``...experts.<e>.w1/w2/w3``) in the releases' tensor
names and configs; stock vLLM loads them itself. The engine test runs offload at 50% and the minimum budget
on the FP8 and AWQ copies: the trained model's routing splits prefills into passes, which is where
``integration/kernel_blocks.py`` keeps each token on stock's kernel path (without it, FP8 at 50% gave other
greedy tokens than stock in 2 of 4 prompts).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.conftest import offload_job, run_engines
from vllm_moe_offload.cli.main import main
from vllm_moe_offload.runtime.amx import cpu_reports_amx

TINY_MIXTRAL = Path(__file__).resolve().parents[2].parent / "shared" / "models" / "tiny-mixtral"
needs_model = pytest.mark.skipif(not TINY_MIXTRAL.is_dir(), reason=f"{TINY_MIXTRAL} is not on this machine")


@pytest.fixture(scope="module")
def quantized(tmp_path_factory) -> dict[str, Path]:
    if not TINY_MIXTRAL.is_dir():
        pytest.skip(f"{TINY_MIXTRAL} is not on this machine")
    root = tmp_path_factory.mktemp("quantize-model")
    out = {}
    for fmt in ("fp8", "awq", "gptq"):
        assert main(["quantize-model", str(TINY_MIXTRAL), str(root / fmt), "--format", fmt, "--no-progress"]) == 0
        out[fmt] = root / fmt
    return out


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


@needs_model
def test_fp8_copy_has_the_release_layout_and_dequantizes_close(quantized):
    src, dst = _tensors(TINY_MIXTRAL), _tensors(quantized["fp8"])
    w = src["model.layers.0.block_sparse_moe.experts.3.w2.weight"].float()  # [H, I]
    q = dst["model.layers.0.block_sparse_moe.experts.3.w2.weight"]
    scale = dst["model.layers.0.block_sparse_moe.experts.3.w2.weight_scale_inv"]
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert scale.dtype == torch.float32 and scale.shape == (w.shape[0] // 128, w.shape[1] // 128)
    back = q.float() * scale.repeat_interleave(128, 0).repeat_interleave(128, 1)
    assert (back - w).abs().max() <= w.abs().max() / 8  # e4m3: 3 mantissa bits
    # everything but the experts is copied as it was
    assert torch.equal(src["model.layers.0.self_attn.q_proj.weight"], dst["model.layers.0.self_attn.q_proj.weight"])
    config = json.loads((quantized["fp8"] / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "fp8" and config["weight_block_size"] == [128, 128]
    assert "model.layers.0.block_sparse_moe.gate" in config["modules_to_not_convert"]
    assert "lm_head" in config["modules_to_not_convert"]
    report = json.loads((quantized["fp8"] / "quantize_model.json").read_text())
    assert report["expert_bytes_after"] / report["expert_bytes_before"] == pytest.approx(0.5, abs=0.01)


@needs_model
def test_awq_copy_unpacks_to_the_weights(quantized):
    from vllm_moe_offload.cli.quantize_model import AWQ_ORDER

    src, dst = _tensors(TINY_MIXTRAL), _tensors(quantized["awq"])
    base = "model.layers.1.block_sparse_moe.experts.0.w1"
    w = src[base + ".weight"].float()  # [out=I, in=H]
    qweight, qzeros, scales = dst[base + ".qweight"], dst[base + ".qzeros"], dst[base + ".scales"]
    assert qweight.shape == (w.shape[1], w.shape[0] // 8) and qweight.dtype == torch.int32
    assert scales.shape == (w.shape[1] // 128, w.shape[0]) and scales.dtype == torch.float16

    def unpack(packed):  # [rows, cols/8] -> [rows, cols]
        values = torch.stack([(packed >> (4 * i)) & 15 for i in range(8)], dim=-1)  # [rows, cols/8, 8]
        return values[..., list(torch.tensor(AWQ_ORDER).argsort())].reshape(packed.shape[0], -1)

    q, zeros = unpack(qweight).float(), unpack(qzeros).float()  # [in, out], [G, out]
    back = (q - zeros.repeat_interleave(128, 0)) * scales.float().repeat_interleave(128, 0)  # [in, out]
    assert (back.t() - w).abs().max() <= scales.float().max() * 0.51  # half a step, rounding
    config = json.loads((quantized["awq"] / "config.json").read_text())["quantization_config"]
    assert config == {**config, "quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True}
    gptq = json.loads((quantized["gptq"] / "config.json").read_text())["quantization_config"]
    assert gptq["desc_act"] is False and r"-:.*\.self_attn\..*" in gptq["dynamic"]


def test_refusals(tmp_path, capsys):
    from vllm_moe_offload.cli.tiny_models import make_tiny_model

    odd = make_tiny_model("mixtral", tmp_path / "odd", intermediate_size=64)  # not a multiple of 128
    assert main(["quantize-model", str(odd), str(tmp_path / "out"), "--format", "fp8", "--no-progress"]) == 2
    assert "multiples of 128" in capsys.readouterr().out
    fine = make_tiny_model("mixtral", tmp_path / "fine", intermediate_size=128, hidden_size=128)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert main(["quantize-model", str(fine), str(tmp_path / "full"), "--format", "awq", "--no-progress"]) == 2
    assert "not empty" in capsys.readouterr().out
    config = json.loads((fine / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq"}
    (fine / "config.json").write_text(json.dumps(config))
    assert main(["quantize-model", str(fine), str(tmp_path / "out2"), "--format", "awq", "--no-progress"]) == 2
    assert "already quantized (awq)" in capsys.readouterr().out


@needs_model
@pytest.mark.engine
@pytest.mark.skipif(not cpu_reports_amx(), reason="vLLM's CPU FP8 and int4 MoE backends need AMX (amx_tile)")
def test_offload_on_quantized_trained_mixtral_equals_stock(quantized, tmp_path):
    models = {fmt: quantized[fmt] for fmt in ("fp8", "awq")}
    stock = run_engines(tmp_path / "stock", [offload_job(f"{f}/stock", m) for f, m in models.items()], stock=True)
    budgets = {"50%": 8, "12.5%": 2}  # slots per layer; 12.5%: top_k = 2 of 16 experts, the minimum
    offload = run_engines(
        tmp_path / "offload",
        [offload_job(f"{f}/{b}", m, policy="lru", budget=b) for f, m in models.items() for b in budgets],
        stock=False,
    )
    for fmt in models:
        for budget in budgets:
            result = offload[f"{fmt}/{budget}"]
            assert result["tokens"] == stock[f"{fmt}/stock"]["tokens"], f"{fmt} at {budget}"
            stats = result["stats"][0]
            assert stats["layer_slots"] == [budgets[budget]] * 8
            assert stats["total"]["misses"] > 0
