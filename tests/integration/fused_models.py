"""Tiny random checkpoints of architectures whose experts are stacked in one tensor per projection.

* ``gemma4`` (``Gemma4ForCausalLM``): ``model.language_model.layers.<n>.experts.gate_up_proj`` [E, 2I, H] and
  ``...experts.down_proj`` [E, H, I], bf16: the names and layout of google/gemma-4-26B-A4B, whose text stack
  vLLM's ``Gemma4ForCausalLM`` loads by mapping ``model.language_model.`` to ``model.``.
* ``llama4`` (``Llama4ForCausalLM``): ``model.layers.<n>.feed_forward.experts.gate_up_proj`` [E, H, 2I] and
  ``...experts.down_proj`` [E, I, H], bf16, transposed: the layout of meta-llama/Llama-4-Scout-17B-16E (whose
  multimodal checkpoint has the same names under ``language_model.``). Top-1 routing, as Llama-4's: vLLM's CPU
  kernel applies the router weight on the input for top-1 only.

Transformers' own model classes make and save them (its ``save_pretrained`` writes these stacked layouts);
only the Gemma-4 names get the release's ``model.language_model.`` prefix. H = 128 and I = 32, so no stacked
tensor is square and the orientation shows in the shapes. The experts get larger weights (std 0.5) than the
rest (0.08), and norms and layer scalars 1, so that the experts decide the greedy tokens: with every weight
at 0.08, permuting the gate rows of every expert changed no token of either model (checked by hand).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from vllm_moe_offload.cli.tiny_models import make_tokenizer

#: what every tiny model shares (vocabulary: the byte tokenizer of cli/tiny_models.py)
_COMMON = dict(
    vocab_size=512, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=32, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
)
NUM_EXPERTS = 8
#: routed experts per token of each model
TOP_K = {"gemma4": 2, "llama4": 1}
#: each model's first MoE layer's stacked tensors as the released checkpoints store them: name -> shape
STACKED = {
    "gemma4": {
        "model.language_model.layers.0.experts.gate_up_proj": [NUM_EXPERTS, 64, 128],  # [E, 2I, H]
        "model.language_model.layers.0.experts.down_proj": [NUM_EXPERTS, 128, 32],  # [E, H, I]
    },
    "llama4": {
        "model.layers.0.feed_forward.experts.gate_up_proj": [NUM_EXPERTS, 128, 64],  # [E, H, 2I]
        "model.layers.0.feed_forward.experts.down_proj": [NUM_EXPERTS, 32, 128],  # [E, I, H]
    },
}


def _config(arch: str):
    import transformers

    if arch == "gemma4":
        return transformers.Gemma4TextConfig(
            **_COMMON, intermediate_size=128, layer_types=["sliding_attention", "full_attention"],
            sliding_window=64, enable_moe_block=True, num_experts=NUM_EXPERTS, top_k_experts=TOP_K[arch],
            moe_intermediate_size=32, vocab_size_per_layer_input=512, hidden_size_per_layer_input=16,
            per_layer_config={}, pad_token_id=0,
        )
    if arch == "llama4":
        return transformers.Llama4TextConfig(
            **_COMMON, intermediate_size=32, intermediate_size_mlp=256, num_local_experts=NUM_EXPERTS,
            num_experts_per_tok=TOP_K[arch], moe_layers=[0, 1], no_rope_layers=[1, 0],
            layer_types=["chunked_attention", "full_attention"], attention_chunk_size=128,  # a multiple of vLLM's block
        )
    raise ValueError(f"unknown architecture {arch!r}; allowed: {sorted(TOP_K)}")


def make_fused_model(arch: str, folder: Path, seed: int = 0) -> Path:
    """Write the tiny ``arch`` checkpoint (bf16 safetensors, stacked experts) and a byte tokenizer to ``folder``."""
    import transformers
    from safetensors.torch import load_file, save_file

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(_config(arch), dtype=torch.bfloat16)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "layer_scalar" in name:
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.5 if ".experts." in name else 0.08)
    model.save_pretrained(str(folder), safe_serialization=True)
    make_tokenizer(folder)
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    if arch == "gemma4":  # the released checkpoint's names (its multimodal wrapper's text stack)
        tensors = {n.replace("model.", "model.language_model.", 1) if n.startswith("model.") else n: t
                   for n, t in tensors.items()}
        save_file(tensors, str(path), metadata={"format": "pt"})
    for name, shape in STACKED[arch].items():
        got = tensors.get(name)
        assert got is not None and list(got.shape) == shape and got.dtype == torch.bfloat16, (
            f"transformers no longer writes {name} as bf16 {shape}: {None if got is None else got.shape}"
        )
    (folder / "tiny_model.json").write_text(json.dumps({"arch": arch, "seed": seed, "stacked": STACKED[arch]}))
    return folder
