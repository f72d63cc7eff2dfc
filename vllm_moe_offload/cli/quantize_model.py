"""``vllm-moe-offload quantize-model``: a copy of a bf16 MoE checkpoint with its experts quantized as the
published releases store them, so the bench can compare the bytes and speed of FP8 and int4 experts with
bf16 on the same model (issue 16).

Only the routed experts are quantized; every other tensor is copied unchanged and named in the
``quantization_config`` as left out, as the releases leave out routers and ``lm_head``. Expert tensors are
recognised in Mixtral's names (``...experts.<e>.w1/w2/w3.weight``) and in the Qwen/DeepSeek names
(``...experts.<e>.gate_proj/up_proj/down_proj.weight``). Formats, each the published scheme:

* ``fp8``: block-128 ``float8_e4m3fn`` with ``weight_scale_inv`` (float32, one per 128 x 128 block), as
  DeepSeek-V3 and Qwen3-FP8 store them: per block ``scale = absmax / 448``, ``weight = fp8(w / scale)``,
  ``weight_scale_inv = scale`` (the name says inverse; it is the factor the weight is multiplied by).
  ``quantization_config = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
  "weight_block_size": [128, 128]}``.
* ``awq``: AutoAWQ's GEMM int4 (``qweight`` int32 ``[in, out/8]``, ``qzeros`` int32 ``[in/128, out/8]``,
  ``scales`` float16 ``[in/128, out]``), asymmetric per output column and group of 128 inputs:
  ``scale = (max - min) / 15``, ``zero = clamp(round(-min / scale), 0, 15)``,
  ``q = clamp(round(w / scale) + zero, 0, 15)``; eight values of consecutive output columns per int32 in the
  order ``[0, 2, 4, 6, 1, 3, 5, 7]`` from the low bits. ``{"quant_method": "awq", "bits": 4,
  "group_size": 128, "zero_point": true, "version": "gemm"}``.
* ``gptq``: AutoGPTQ's v1 symmetric int4 without ``desc_act`` (``qweight`` int32 ``[in/8, out]``, eight
  consecutive inputs per int32 from the low bits; ``qzeros`` int32 ``[in/128, out/8]`` holding the zero
  point minus one, 7; ``scales`` float16 ``[in/128, out]``): ``scale = 2 * absmax / 15``,
  ``q = clamp(round(w / scale) + 8, 0, 15)``. GPTQ has no ``modules_to_not_convert``: the other layers are
  left out with vLLM's negative ``dynamic`` patterns, as GPTQModel writes them.

Every expert projection's input and output sizes must be multiples of 128 (the block / group).
Tensors are read and written one at a time, in shards, so memory stays bounded for a model of many GB.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

from vllm_moe_offload.cli.main import Subcommand

#: one expert projection's weight, in Mixtral's and in the Qwen/DeepSeek names
EXPERT_WEIGHT_RE = re.compile(r"\.experts\.\d+\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
#: FP8 block and int4 group size of the published releases
BLOCK = 128
#: the largest finite float8_e4m3fn value
FP8_MAX = 448.0
#: AutoAWQ's GEMM packing: the 4-bit value of output column ``8 * c + AWQ_ORDER[i]`` is bits ``4i..4i+3``
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
#: int4 values per int32
PACK = 8

FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [BLOCK, BLOCK]}
AWQ_CONFIG = {"quant_method": "awq", "bits": 4, "group_size": BLOCK, "zero_point": True, "version": "gemm"}
GPTQ_CONFIG = {"quant_method": "gptq", "bits": 4, "group_size": BLOCK, "desc_act": False, "sym": True}
FORMATS = ("fp8", "awq", "gptq")


def quantize_fp8_block(w, block: int = BLOCK):
    """``w [N, K]`` -> (``float8_e4m3fn [N, K]``, ``weight_scale_inv`` float32 ``[ceil(N/b), ceil(K/b)]``)."""
    import torch

    n, k = w.shape
    rows, cols = math.ceil(n / block), math.ceil(k / block)
    padded = torch.zeros(rows * block, cols * block, dtype=torch.float32)
    padded[:n, :k] = w.float()
    blocks = padded.view(rows, block, cols, block)  # [r, b, c, b]
    scale = blocks.abs().amax(dim=(1, 3)) / FP8_MAX  # [r, c]
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(rows * block, cols * block)[:n, :k].contiguous(), scale.contiguous()


def quantize_awq(w, group: int = BLOCK):
    """``w [out, in]`` (a Linear's weight) -> AWQ GEMM (``qweight`` int32 ``[in, out/8]``, ``qzeros`` int32
    ``[in/g, out/8]``, ``scales`` float16 ``[in/g, out]``), asymmetric per group of ``g`` inputs."""
    import torch

    out_features, in_features = w.shape
    groups = w.float().reshape(out_features, in_features // group, group)  # [out, G, g]
    w_max, w_min = groups.amax(dim=2), groups.amin(dim=2)  # [out, G]
    scales = ((w_max - w_min).clamp(min=1e-5) / 15).half()  # stored in float16: quantize with what is stored
    zeros = (-w_min / scales.float()).round().clamp(0, 15)  # [out, G]
    q = ((groups / scales.float()[..., None]).round() + zeros[..., None]).clamp(0, 15)  # [out, G, g]
    q = q.reshape(out_features, in_features).t().to(torch.int32)  # [in, out]
    return awq_pack(q), awq_pack(zeros.t().to(torch.int32)), scales.t().contiguous()


def awq_pack(values):
    """int32 ``[rows, cols]`` of 4-bit values -> int32 ``[rows, cols/8]`` in AutoAWQ's order."""
    import torch

    rows, cols = values.shape
    grouped = values.reshape(rows, cols // PACK, PACK)  # [rows, cols/8, 8]
    packed = torch.zeros(rows, cols // PACK, dtype=torch.int64)
    for i, column in enumerate(AWQ_ORDER):
        packed |= grouped[..., column].to(torch.int64) << (4 * i)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)  # the same 32 bits, signed


def quantize_gptq(w, group: int = BLOCK):
    """``w [out, in]`` -> GPTQ v1 symmetric (``qweight`` int32 ``[in/8, out]``, ``qzeros`` int32
    ``[in/g, out/8]``, ``scales`` float16 ``[in/g, out]``)."""
    import torch

    out_features, in_features = w.shape
    groups = w.float().reshape(out_features, in_features // group, group)  # [out, G, g]
    scales = (groups.abs().amax(dim=2) * 2 / 15).clamp(min=1e-5).half()  # [out, G]; symmetric: min = -max
    q = ((groups / scales.float()[..., None]).round() + 8).clamp(0, 15)  # [out, G, g]
    q = q.reshape(out_features, in_features).t().to(torch.int32)  # [in, out]
    zeros = torch.full((in_features // group, out_features), 8 - 1, dtype=torch.int32)  # v1 stores zero - 1
    return pack_rows(q), pack_rows(zeros.t()).t().contiguous(), scales.t().contiguous()


def pack_rows(values):
    """int32 ``[rows, cols]`` of 4-bit values -> int32 ``[rows/8, cols]``: row ``8r + i`` in bits ``4i..4i+3``."""
    import torch

    rows, cols = values.shape
    grouped = values.reshape(rows // PACK, PACK, cols).to(torch.int64)  # [rows/8, 8, cols]
    packed = torch.zeros(rows // PACK, cols, dtype=torch.int64)
    for i in range(PACK):
        packed |= grouped[:, i] << (4 * i)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)  # the same 32 bits, signed


def expert_tensors(fmt: str, name: str, w) -> dict:
    """One expert projection's checkpoint weight ``name`` (``[out, in]``) -> its tensors in format ``fmt``."""
    if fmt == "fp8":
        weight, scale_inv = quantize_fp8_block(w)
        return {name: weight, name + "_scale_inv": scale_inv}
    qweight, qzeros, scales = (quantize_awq if fmt == "awq" else quantize_gptq)(w)
    base = name.removesuffix(".weight")
    return {f"{base}.qweight": qweight, f"{base}.qzeros": qzeros, f"{base}.scales": scales}


def quantization_config(fmt: str, kept_modules: list[str]) -> dict:
    """The ``quantization_config`` of ``fmt`` with ``kept_modules`` (linear layers not quantized) left out."""
    if fmt == "gptq":
        # GPTQ names what it leaves out with vLLM's negative "dynamic" patterns. vLLM matches them against its
        # own module names, where attention's projections are fused (qkv_proj): one pattern for attention,
        # one exact pattern for each other module (routers, lm_head)
        patterns = [r"-:.*\.self_attn\..*"]
        patterns += [f"-:{re.escape(m)}$" for m in kept_modules if ".self_attn." not in m]
        return {**GPTQ_CONFIG, "dynamic": {pattern: {} for pattern in patterns}}
    return {**(FP8_CONFIG if fmt == "fp8" else AWQ_CONFIG), "modules_to_not_convert": kept_modules}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from vllm_moe_offload.cli.pad_model import add_writer_arguments

    parser.add_argument("src", type=Path, help="folder of a bf16 MoE checkpoint with one tensor per expert")
    parser.add_argument("dst", type=Path, help="folder to write (created; must be empty or absent)")
    parser.add_argument(
        "--format", choices=FORMATS, required=True,
        help="fp8: block-128 FP8 (DeepSeek-V3 / Qwen3-FP8 releases); awq: AutoAWQ GEMM int4, group 128; "
        "gptq: AutoGPTQ v1 symmetric int4, group 128, no desc_act",
    )
    add_writer_arguments(parser)


def run(args: argparse.Namespace) -> int:
    try:
        report = quantize_model(args.src, args.dst, args.format, shard_bytes=args.shard_bytes,
                                progress=not args.no_progress)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"vllm-moe-offload quantize-model: error: {exc}")
        return 2
    print(
        f"wrote {args.dst}: {report['num_expert_tensors']} expert tensors as {args.format}, experts "
        f"{report['expert_bytes_before'] / 2**20:.1f} MiB -> {report['expert_bytes_after'] / 2**20:.1f} MiB "
        f"({report['expert_bytes_after'] / report['expert_bytes_before']:.1%}), {len(report['shards'])} shard(s)"
    )
    return 0


def quantize_model(
    src: str | Path, dst: str | Path, fmt: str, *, shard_bytes: int | None = None, progress: bool = True,
) -> dict:
    """Write ``src`` with its experts quantized to ``fmt`` into ``dst``; returns what ``quantize_model.json``
    records (the expert bytes before and after)."""
    from safetensors import safe_open
    from tqdm import tqdm

    from vllm_moe_offload.cli.pad_model import DEFAULT_SHARD_BYTES, _copy_small_files, _ShardWriter

    src, dst = Path(src), Path(dst)
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    config_path = src / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no config.json in {src}")
    config = json.loads(config_path.read_text())
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "?")
        raise ValueError(f"{src} is already quantized ({method}); quantize-model needs a bf16/fp16 checkpoint")
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {src}")
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"{dst} exists and is not empty")

    handles = [safe_open(str(path), framework="pt") for path in files]
    names = [(h, name) for h in handles for name in sorted(h.keys())]
    experts = [name for _, name in names if EXPERT_WEIGHT_RE.search(name)]
    if not experts:
        raise ValueError(
            f"no per-expert tensors in {src} (...experts.<e>.w1/w2/w3.weight or "
            "...experts.<e>.gate_proj/up_proj/down_proj.weight)"
        )
    for handle, name in names:
        if EXPERT_WEIGHT_RE.search(name):
            shape = handle.get_slice(name).get_shape()
            if len(shape) != 2 or shape[0] % BLOCK or shape[1] % BLOCK:
                raise ValueError(f"{name} is {list(shape)}: {fmt} needs both sizes multiples of {BLOCK}")

    dst.mkdir(parents=True, exist_ok=True)
    writer = _ShardWriter(dst, shard_bytes or DEFAULT_SHARD_BYTES)
    before = after = 0
    kept = set()
    for handle, name in tqdm(names, desc=f"quantizing experts ({fmt})", unit="tensor", disable=not progress or None):
        tensor = handle.get_tensor(name)
        if EXPERT_WEIGHT_RE.search(name):
            before += tensor.numel() * tensor.element_size()
            for out_name, out in expert_tensors(fmt, name, tensor).items():
                after += out.numel() * out.element_size()
                writer.add(out_name, out)
            continue
        if name.endswith(".weight") and tensor.dim() == 2 and "embed" not in name:
            kept.add(name.removesuffix(".weight"))  # a linear layer (router, attention, lm_head) left as is
        writer.add(name, tensor)
    shards = writer.close()

    config["quantization_config"] = quantization_config(fmt, sorted(kept))
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    copied = _copy_small_files(src, dst)
    report = {
        "source": str(src.resolve()),
        "format": fmt,
        "num_expert_tensors": len(experts),
        "expert_bytes_before": before,
        "expert_bytes_after": after,
        "shards": [p.name for p in shards],
        "copied": copied,
    }
    (dst / "quantize_model.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


COMMAND = Subcommand(
    name="quantize-model",
    help="copy a bf16 MoE checkpoint with its experts quantized to FP8 block-128, AWQ or GPTQ int4",
    add_arguments=add_arguments,
    run=run,
)
