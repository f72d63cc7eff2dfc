"""Every MoE layer class vLLM builds is offloaded, or refused at start-up naming the class and the model.

vLLM builds some models' experts as ``RoutedExperts`` subclasses of their own, which the plugin's
out-of-tree ``RoutedExperts`` used not to replace: the Transformers backend's ``TransformersRoutedExperts``
(offloaded now: it changes only its checkpoint names), DBRX's ``DbrxExperts`` and gpt-oss's
``GptOssRoutedExperts`` (refused: their own weight loaders). Before, all three logged "has no MoE layers"
and ran with the experts the loader had skipped (the Transformers backend then greedily produced only
token 0).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import offload_job, run_engines

#: the Transformers backend, on two checkpoint namings: Qwen3-MoE's gate_proj/up_proj/down_proj and
#: Mixtral's w1/w3/w2 (both in TransformersRoutedExperts' expert mapping)
BACKEND = {"model_impl": "transformers"}
BUDGETS = {"100%": ("100%", 8), "50%": ("50%", 4), "min": ("25%", 2)}


def test_refusal_reasons_follow_what_each_class_overrides():
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
    from vllm.model_executor.models.dbrx import DbrxExperts
    from vllm.model_executor.models.gpt_oss import GptOssRoutedExperts
    from vllm.model_executor.models.transformers.moe import TransformersRoutedExperts

    from vllm_moe_offload.integration.layer_classes import refusal

    assert refusal(RoutedExperts) is None
    assert refusal(TransformersRoutedExperts) is None  # only get_expert_mapping: offload reads its names
    assert refusal(DbrxExperts).startswith("overrides weight_loader:")  # 2-D [E * I, H] tensors of its own
    assert refusal(GptOssRoutedExperts).startswith("overrides weight_loader and adds _copy_to_expert")


def _job(name, model, engine=None, **offload):
    job = offload_job(name, model, **offload)
    job["engine"] = {**job["engine"], **(engine or {})}
    return job


@pytest.fixture(scope="module")
def backend(tiny_models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("transformers_backend")
    model = tiny_models["qwen3_moe"]
    stock = run_engines(tmp / "stock", [
        _job("qwen3_moe/stock", model, BACKEND), _job("mixtral/stock", tiny_models["mixtral"], BACKEND),
    ], stock=True)
    offload = run_engines(tmp / "offload", [
        *(_job(f"qwen3_moe/{label}", model, BACKEND, policy="lru", budget=b) for label, (b, _) in BUDGETS.items()),
        _job("mixtral/50%", tiny_models["mixtral"], BACKEND, policy="lru", budget="50%"),
    ], stock=False)
    # vLLM's default multiprocess mode: the worker, a process of its own, registers the class again
    multiprocess = run_engines(tmp / "multiprocess", [
        _job("qwen3_moe/50%/multiprocess", model, BACKEND, policy="fate", budget="50%"),
    ], stock=False, multiprocess=True)
    return stock, {**offload, **multiprocess}


@pytest.mark.engine
@pytest.mark.parametrize("name", [*(f"qwen3_moe/{b}" for b in BUDGETS), "mixtral/50%", "qwen3_moe/50%/multiprocess"])
def test_transformers_backend_is_offloaded_with_tokens_identical_to_stock(backend, name):
    stock, offload = backend
    got = offload[name]
    assert "error" not in got, got.get("error")
    assert got["tokens"] == stock[f"{name.split('/')[0]}/stock"]["tokens"]
    stats = got["stats"][0]
    slots = BUDGETS[name.split("/")[1]][1]
    assert stats["layer_slots"] == [slots, slots]
    assert stats["total"]["loads"] > 0
    if slots < 8:
        assert stats["total"]["misses"] > 0
    assert "has no MoE layers" not in Path(got["log"]).read_text()


def _make(arch: str, folder: Path) -> Path:
    """A tiny random DBRX or gpt-oss (bf16, unquantized) checkpoint written by transformers."""
    import torch
    import transformers

    from vllm_moe_offload.cli.tiny_models import make_tokenizer

    common = dict(vocab_size=512, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2)
    if arch == "dbrx":
        config = transformers.DbrxConfig(
            d_model=128, n_heads=4, n_layers=2, max_seq_len=1024, attn_config={"kv_n_heads": 2, "rope_theta": 1e4},
            ffn_config={"ffn_hidden_size": 64, "moe_num_experts": 8, "moe_top_k": 2}, **common,
        )
    else:
        config = transformers.GptOssConfig(
            hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
            intermediate_size=64, num_local_experts=8, num_experts_per_tok=2, sliding_window=64,
            layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=False, **common,
        )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(str(folder))
    make_tokenizer(folder)
    return folder


@pytest.mark.engine
def test_subclasses_that_load_their_own_way_are_refused_naming_class_and_model(tmp_path):
    models = {arch: _make(arch, tmp_path / arch) for arch in ("dbrx", "gpt_oss")}
    got = run_engines(tmp_path / "run", [
        offload_job(arch, model, policy="lru", budget="50%") for arch, model in models.items()
    ], stock=False)
    expected = {
        "dbrx": ("transformer.blocks.0.ffn", "vllm.model_executor.models.dbrx.DbrxExperts"),
        "gpt_oss": ("model.layers.0.mlp.experts", "vllm.model_executor.models.gpt_oss.GptOssRoutedExperts"),
    }
    for arch, (layer, cls) in expected.items():
        assert got[arch]["error"].startswith(
            f"NotImplementedError: MoE offload cannot offload {models[arch]}: vLLM builds its MoE layer {layer} "
            f"as {cls}, which overrides weight_loader"
        ), got[arch]["error"]
        assert got[arch]["error"].endswith("Run this model without --moe-offload.")
    assert "has no MoE layers" not in Path(got["dbrx"]["log"]).read_text()
