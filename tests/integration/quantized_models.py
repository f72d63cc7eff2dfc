"""Tiny checkpoints whose experts are quantized as the published releases store them.

* ``fp8`` (Qwen3-MoE, as Qwen/Qwen3-30B-A3B-FP8 and the DeepSeek-V3 releases): every expert projection
  ``model.layers.<n>.mlp.experts.<e>.{gate,up,down}_proj.weight`` in ``float8_e4m3fn`` with its
  ``...weight_scale_inv`` (float32, one per 128 x 128 block: ``[ceil(out/128), ceil(in/128)]``), and
  ``quantization_config = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
  "weight_block_size": [128, 128]}``. The scheme (DeepSeek's): per block, ``scale = absmax / 448``
  (448: the largest e4m3 value), ``weight = round-to-fp8(w / scale)``, and ``weight_scale_inv = scale``
  (the name says inverse; it is what the weight is multiplied by). Only the experts are quantized here:
  everything else is listed in ``modules_to_not_convert``, as the releases list the routers and
  ``lm_head`` (so that the test's tokens depend on the expert path alone).

* ``awq`` (Mixtral / Qwen3-MoE AWQ releases, AutoAWQ's GEMM version): every expert projection ``Linear(in, out)``
  as ``...{gate,up,down}_proj.qweight`` (int32 ``[in, out/8]``), ``...qzeros`` (int32 ``[in/128, out/8]``) and
  ``...scales`` (float16 ``[in/128, out]``), and ``quantization_config = {"quant_method": "awq", "bits": 4,
  "group_size": 128, "zero_point": true, "version": "gemm"}``. The scheme (AutoAWQ's ``pseudo_quantize_tensor``
  and ``WQLinear_GEMM.from_linear``): per output column and group of 128 inputs, ``scale = (max - min) / 15``,
  ``zero = clamp(round(-min / scale), 0, 15)``, ``q = clamp(round(w / scale) + zero, 0, 15)``; eight 4-bit
  values of consecutive output columns per int32, in the order ``[0, 2, 4, 6, 1, 3, 5, 7]`` from the low bits
  (zero points packed the same way). Again only the experts are quantized (``modules_to_not_convert``).

* ``gptq`` (Qwen3-MoE / Mixtral GPTQ-Int4 releases, AutoGPTQ's v1 format, symmetric, no ``desc_act``): every
  expert projection as ``...qweight`` (int32 ``[in/8, out]``: eight consecutive inputs per int32 from the low
  bits), ``...qzeros`` (int32 ``[in/128, out/8]``, consecutive outputs, each zero point stored minus one as
  v1 does: 7 for the symmetric 8) and ``...scales`` (float16 ``[in/128, out]``), and ``quantization_config =
  {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": false, "sym": true}``. The scheme
  (AutoGPTQ's symmetric quantizer): per output column and group, ``scale = 2 * absmax / 15``,
  ``q = clamp(round(w / scale) + 8, 0, 15)``. GPTQ has no ``modules_to_not_convert``: the other layers are
  left out with vLLM's ``dynamic`` negative patterns (``-:<regex>``), as GPTQModel writes them.

Hidden size 256 and moe_intermediate_size 128 (multiples of the block). The experts get larger weights
(std 0.5) than the rest (0.08), as in fused_models.py, so that they decide the greedy tokens.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from vllm_moe_offload.cli import quantize_model
from vllm_moe_offload.cli.tiny_models import make_tiny_model

NUM_EXPERTS = 8
TOP_K = 2
#: one block in each dimension: hidden and moe_intermediate_size must be multiples of the block
BLOCK = 128
#: two blocks of hidden size and one of the experts' intermediate size: block scales [2, 2] (gate_up),
#: [1, 2] (gate, up) and [2, 1] (down), so a scale read along the wrong axis changes the result
HIDDEN, MOE_INTERMEDIATE = 2 * BLOCK, BLOCK
AWQ_CONFIG, FP8_CONFIG = quantize_model.AWQ_CONFIG, quantize_model.FP8_CONFIG
GPTQ_CONFIG = {
    **quantize_model.GPTQ_CONFIG,
    "dynamic": {r"-:.*\.self_attn\..*": {}, r"-:.*\.mlp\.gate$": {}},  # attention and routers stay bf16
}


def make_gptq_model(folder: Path, seed: int = 0) -> Path:
    """A tiny Qwen3-MoE whose experts are GPTQ int4 (v1, symmetric), in the released tensor names and config."""
    return _quantized_experts(folder, seed, functools.partial(quantize_model.expert_tensors, "gptq"), GPTQ_CONFIG)


def make_awq_model(folder: Path, seed: int = 0) -> Path:
    """A tiny Qwen3-MoE whose experts are AWQ int4 (GEMM), in the released tensor names and config."""
    return _quantized_experts(folder, seed, functools.partial(quantize_model.expert_tensors, "awq"), AWQ_CONFIG)


def make_fp8_model(folder: Path, seed: int = 0) -> Path:
    """A tiny Qwen3-MoE whose experts are FP8 block-128, in the released tensor names and config."""
    return _quantized_experts(folder, seed, functools.partial(quantize_model.expert_tensors, "fp8"), FP8_CONFIG)


def _quantized_experts(folder: Path, seed: int, quantize, quant_config: dict) -> Path:
    """A tiny Qwen3-MoE whose expert weights ``quantize(name, w)`` turns into its checkpoint tensors."""
    from safetensors.torch import load_file, save_file

    make_tiny_model("qwen3_moe", folder, seed=seed, hidden_size=HIDDEN, moe_intermediate_size=MOE_INTERMEDIATE,
                    num_experts=NUM_EXPERTS, num_experts_per_tok=TOP_K)
    path = folder / "model.safetensors"
    generator = torch.Generator().manual_seed(seed)
    out, keep = {}, set()
    for name, tensor in load_file(str(path)).items():
        if ".mlp.experts." not in name:
            if "norm" in name:
                tensor = torch.ones_like(tensor)
            out[name] = tensor
            keep.add(name.rsplit(".", 1)[0])
            continue
        w = torch.randn(tensor.shape, generator=generator) * 0.5
        out.update(quantize(name, w))
    save_file(out, str(path), metadata={"format": "pt"})
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    not_converted = sorted(m for m in keep if not m.startswith("model.embed_tokens") and "norm" not in m)
    # GPTQ names the layers it leaves out in its own "dynamic" patterns, compressed-tensors in its "ignore" list
    config["quantization_config"] = (
        quant_config if "dynamic" in quant_config or "ignore" in quant_config
        else {**quant_config, "modules_to_not_convert": not_converted}
    )
    config_path.write_text(json.dumps(config, indent=2))
    return folder


#: llm-compressor's ``W4A16`` preset (compressed-tensors): int4, symmetric, groups of 128 inputs, minmax scales
W4A16_PRESET = "W4A16"


def quantize_w4a16(w: torch.Tensor, preset: str = W4A16_PRESET) -> dict[str, torch.Tensor]:
    """``w [out, in]`` -> compressed-tensors pack-quantized (``weight_packed`` int32 ``[out, in/8]``,
    ``weight_scale`` in ``w``'s dtype ``[out, in/g]``, ``weight_shape`` int64 ``[2]``; ``W4A16_ASYM`` also
    ``weight_zero_point`` int32 ``[out/8, in/g]``, eight outputs an int32), by compressed-tensors' own scheme,
    observer arithmetic and compressor, as llm-compressor writes a W4A16 checkpoint."""
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.utils import calculate_qparams

    scheme = preset_name_to_scheme(preset, ["Linear"])
    group = scheme.weights.group_size
    out_features, in_features = w.shape
    groups = w.float().reshape(out_features, in_features // group, group)  # [out, G, g]
    scale, zero_point = calculate_qparams(groups.amin(dim=2), groups.amax(dim=2), scheme.weights)  # [out, G]
    return PackedQuantizationCompressor.compress(
        {"weight": w, "weight_scale": scale.to(w.dtype), "weight_zero_point": zero_point.to(torch.int8)}, scheme,
    )


def w4a16_config(ignore: list[str], preset: str = W4A16_PRESET) -> dict:
    """The ``quantization_config`` llm-compressor writes for the W4A16 preset (pack-quantized)."""
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme

    config = QuantizationConfig(
        config_groups={"group_0": preset_name_to_scheme(preset, ["Linear"])}, format="pack-quantized",
        quantization_status="compressed", ignore=ignore,
    )
    return config.model_dump(mode="json")


def make_w4a16_model(folder: Path, seed: int = 0, preset: str = W4A16_PRESET) -> Path:
    """A tiny Qwen3-MoE whose experts are compressed-tensors W4A16 (pack-quantized, group 128; symmetric, or
    with zero points for ``W4A16_ASYM``), in llm-compressor's tensor names and config; attention and routers
    in its ``ignore`` list."""

    def quantize(name: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
        base = name.removesuffix(".weight")
        return {f"{base}.{key}": t for key, t in quantize_w4a16(w.to(torch.bfloat16), preset).items()}

    config = w4a16_config(["lm_head", r"re:.*self_attn\..*", r"re:.*mlp\.gate$"], preset)
    return _quantized_experts(folder, seed, quantize, config)


#: FP4 (e2m1) values by 4-bit code, sign in the high bit (OCP MX; transformers' ``FP4_VALUES``)
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
#: MXFP4: one power-of-two scale (e8m0, biased by 127) per 32 values along the input
MX_BLOCK = 32
MXFP4_CONFIG = {
    "quant_method": "mxfp4",
    "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head",
    ],
}


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [..., out, in]`` -> gpt-oss MXFP4 (``blocks`` uint8 ``[..., out, in/32, 16]``: two FP4 codes a byte,
    the even input in the low nibble; ``scales`` uint8 ``[..., out, in/32]``: the block's exponent + 127).
    The scale rounds up (the block's absmax / 6, to the next power of two), so no value clips; each value is
    rounded to the nearest FP4 value (ties to the even code)."""
    *lead, out_features, in_features = w.shape
    blocks = w.float().reshape(*lead, out_features, in_features // MX_BLOCK, MX_BLOCK)
    absmax = blocks.abs().amax(dim=-1)  # [..., out, G]
    exponent = torch.ceil(torch.log2(torch.where(absmax > 0, absmax / 6.0, torch.ones_like(absmax)))).clamp(-127, 127)
    scaled = blocks / torch.exp2(exponent)[..., None]  # |x| <= 6
    magnitudes = torch.tensor(FP4_VALUES[:8])
    distance = (scaled.abs()[..., None] - magnitudes).abs()  # [..., 32, 8]
    # nearest magnitude; on a tie the even code (the first of two minima with an even index)
    best = distance.min(dim=-1, keepdim=True).values
    ties = (distance == best) & (torch.arange(8) % 2 == 0)
    code = torch.where(ties.any(dim=-1), ties.to(torch.int8).argmax(dim=-1), distance.argmin(dim=-1))
    code = code.to(torch.uint8) | ((scaled < 0) & (code > 0)).to(torch.uint8) << 3
    packed = code[..., 0::2] | (code[..., 1::2] << 4)  # [..., out, G, 16]
    return packed.contiguous(), (exponent + 127).to(torch.uint8).contiguous()


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`quantize_mxfp4`: ``[..., out, in]`` float32."""
    lut = torch.tensor(FP4_VALUES)
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).flatten(-2).long()  # [..., out, G, 32]
    values = lut[codes] * torch.exp2(scales.float() - 127)[..., None]
    return values.flatten(-2)


def make_gpt_oss_mxfp4_model(folder: Path, seed: int = 0) -> Path:
    """A tiny gpt-oss whose experts are MXFP4 as openai/gpt-oss-20b stores them: per layer
    ``mlp.experts.gate_up_proj_blocks`` (uint8 ``[E, 2I, H/32, 16]``, gate and up rows interleaved),
    ``..._scales`` (uint8 ``[E, 2I, H/32]``), ``..._bias`` (bf16 ``[E, 2I]``) and the same for ``down_proj``
    (``[E, H, I/32, 16]``, ``[E, H, I/32]``, ``[E, H]``); ``quantization_config`` ``{"quant_method": "mxfp4",
    "modules_to_not_convert": [...]}`` as the release's. The experts' weights and biases are drawn with std 0.5
    (the rest 0.08), so that both decide the greedy tokens. Hidden 128, intermediate 64 (multiples of the block and
    of the CPU kernel's 32), 8 experts, top-2, two layers (sliding and full attention)."""
    import transformers
    from safetensors.torch import load_file, save_file

    from vllm_moe_offload.cli.tiny_models import make_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    config = transformers.GptOssConfig(
        hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        intermediate_size=64, num_local_experts=NUM_EXPERTS, num_experts_per_tok=TOP_K, sliding_window=64,
        layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=False, vocab_size=512,
        max_position_embeddings=1024, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.08)
    model.save_pretrained(str(folder), safe_serialization=True)
    make_tokenizer(folder)
    path = folder / "model.safetensors"
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, tensor in load_file(str(path)).items():
        if "norm" in name:
            tensor = torch.ones_like(tensor)
        if name.endswith((".experts.gate_up_proj_bias", ".experts.down_proj_bias")):
            # as large as the weights' products, so that a bias left out of a slot changes the tokens
            out[name] = (torch.randn(tensor.shape, generator=generator) * 0.5).to(torch.bfloat16)
            continue
        if not name.endswith((".experts.gate_up_proj", ".experts.down_proj")):
            out[name] = tensor
            continue
        # transformers keeps [E, in, out]; the release stores [E, out, in] blocks
        w = (torch.randn(tensor.shape, generator=generator) * 0.5).transpose(1, 2)
        out[name + "_blocks"], out[name + "_scales"] = quantize_mxfp4(w.to(torch.bfloat16))
    save_file(out, str(path), metadata={"format": "pt"})
    config_path = folder / "config.json"
    hf_config = json.loads(config_path.read_text())
    hf_config["quantization_config"] = MXFP4_CONFIG
    config_path.write_text(json.dumps(hf_config, indent=2))
    return folder


#: llm-compressor's ``W8A8`` preset (compressed-tensors): int8 weights, symmetric, one scale per output
#: channel; int8 activations, symmetric, one dynamic scale per token
W8A8_PRESET = "W8A8"


def quantize_w8a8(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """``w [out, in]`` -> compressed-tensors int-quantized (``weight`` int8 ``[out, in]``, ``weight_scale`` in
    ``w``'s dtype ``[out, 1]``), by compressed-tensors' own W8A8 scheme, observer arithmetic and compressor."""
    from compressed_tensors.compressors.naive_quantized import IntQuantizationCompressor
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.utils import calculate_qparams

    scheme = preset_name_to_scheme(W8A8_PRESET, ["Linear"])
    rows = w.float()
    scale, zero_point = calculate_qparams(rows.amin(dim=1, keepdim=True), rows.amax(dim=1, keepdim=True),
                                          scheme.weights)  # [out, 1]
    return IntQuantizationCompressor.compress(
        {"weight": w, "weight_scale": scale.to(w.dtype), "weight_zero_point": zero_point.to(torch.int8)}, scheme,
    )


def make_w8a8_model(folder: Path, seed: int = 0) -> Path:
    """A tiny Qwen3-MoE whose experts are compressed-tensors W8A8 int8 (int-quantized, per-channel weights,
    dynamic per-token activations), in llm-compressor's tensor names and config."""
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme

    def quantize(name: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
        base = name.removesuffix(".weight")
        return {f"{base}.{key}": t for key, t in quantize_w8a8(w.to(torch.bfloat16)).items()}

    config = QuantizationConfig(
        config_groups={"group_0": preset_name_to_scheme(W8A8_PRESET, ["Linear"])}, format="int-quantized",
        quantization_status="compressed", ignore=["lm_head", r"re:.*self_attn\..*", r"re:.*mlp\.gate$"],
    ).model_dump(mode="json")
    return _quantized_experts(folder, seed, quantize, config)
