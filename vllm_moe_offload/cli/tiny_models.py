"""Tiny random-weight MoE checkpoints of several architectures, made locally.

For correctness tests and the demo only: random routing says nothing about
prediction or hit rates (use ``../shared/models/tiny-mixtral`` for those). Each
model gets a byte-level tokenizer built here from nothing (256 byte tokens and
three specials), so no download is ever needed. Head sizes are 32, the smallest
vLLM's CPU attention accepts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: vocabulary: 256 byte tokens + <s>, </s>, <unk>; the models' embeddings are a bit larger
VOCAB_SIZE = 512

_COMMON: dict[str, Any] = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,  # head size 32
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
}

ARCHITECTURES: dict[str, tuple[str, dict[str, Any]]] = {
    # dense (no MoE layers): offload must leave it unchanged
    "llama": ("LlamaConfig", {"intermediate_size": 256}),
    "mixtral": ("MixtralConfig", {"intermediate_size": 256, "num_local_experts": 8, "num_experts_per_tok": 2}),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        {
            "intermediate_size": 256, "moe_intermediate_size": 64, "shared_expert_intermediate_size": 128,
            "num_experts": 8, "num_experts_per_tok": 2, "decoder_sparse_step": 1, "norm_topk_prob": False,
        },
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        {
            "intermediate_size": 256, "moe_intermediate_size": 64, "num_experts": 8, "num_experts_per_tok": 2,
            "head_dim": 32, "decoder_sparse_step": 1, "norm_topk_prob": True,
        },
    ),
    "olmoe": ("OlmoeConfig", {"intermediate_size": 64, "num_experts": 8, "num_experts_per_tok": 2}),
    # Grouped top-k (2 groups, 1 chosen) with a shared expert, and MLA attention:
    # vLLM's MLA needs kv_lora_rank + qk_rope_head_dim in {320, 512, 576}, so 512 + 64.
    "deepseek_v2": (
        "DeepseekV2Config",
        {
            "intermediate_size": 256, "moe_intermediate_size": 64, "n_routed_experts": 8, "n_shared_experts": 1,
            "num_experts_per_tok": 2, "first_k_dense_replace": 0, "moe_layer_freq": 1,
            "topk_method": "group_limited_greedy", "n_group": 2, "topk_group": 1, "norm_topk_prob": False,
            "kv_lora_rank": 512, "q_lora_rank": None, "qk_rope_head_dim": 64, "qk_nope_head_dim": 32,
            "v_head_dim": 32, "head_dim": 64, "num_key_value_heads": 4, "routed_scaling_factor": 1.0,
            "rope_scaling": None,
        },
    ),
}


def make_tokenizer(folder: Path) -> None:
    """Write a byte-level BPE tokenizer with no merges (every byte is a token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins of bytes
    specials = ["<unk>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
    )
    fast.save_pretrained(str(folder))


def make_tiny_model(arch: str, folder: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """Write a random-weight ``arch`` checkpoint (bf16 safetensors) and tokenizer to ``folder``."""
    import torch
    import transformers

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; allowed: {sorted(ARCHITECTURES)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config_cls, extra = ARCHITECTURES[arch]
    config = getattr(transformers, config_cls)(**{**_COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():
        for param in model.parameters():
            # wider than the default init so that routing and tokens vary
            param.normal_(0.0, 0.08)
    model.save_pretrained(str(folder), safe_serialization=True)
    make_tokenizer(folder)
    (folder / "tiny_model.json").write_text(json.dumps({"arch": arch, "seed": seed, "overrides": overrides}))
    return folder
