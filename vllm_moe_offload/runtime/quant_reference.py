"""A copy of a checkpoint whose routed experts hold their quantized-then-dequantized values.

Stock vLLM on that copy computes what the quantized tier computes, so it is the
reference for token-equality tests and for measuring what quantization costs in
quality (perplexity, top-1 agreement) apart from anything offload does.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from vllm_moe_offload.runtime.quant import GROUP_OF_BITS, dequantize, quantize

#: routed-expert projections (Mixtral w1/w2/w3, Qwen/DeepSeek/OLMoE gate/up/down_proj); shared experts excluded
EXPERT_TENSOR = re.compile(r"\.experts\.\d+\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")


def write_dequantized_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, bits: int) -> int:
    """Copy ``src`` to ``dst`` with every expert weight replaced by dequantize(quantize(w, bits)).

    Returns the number of tensors replaced. Non-safetensors files are copied as they are.
    """
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    replaced = 0
    for path in sorted(src.iterdir()):
        if path.suffix != ".safetensors":
            if path.is_file():
                shutil.copy2(path, dst / path.name)
            continue
        tensors = load_file(path)
        for name, w in tensors.items():
            if EXPERT_TENSOR.search(name):
                tensors[name] = dequantize(quantize(w, bits, GROUP_OF_BITS[bits]), w.dtype)
                replaced += 1
        save_file(tensors, dst / path.name, metadata={"format": "pt"})
    return replaced
