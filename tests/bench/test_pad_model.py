"""``pad-model`` keeps the model's function: same logits (transformers, float64) and same greedy tokens (vLLM)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import PROMPTS, TINY_PYMOE, run_engines
from vllm_moe_offload.cli.main import main
from vllm_moe_offload.cli.pad_model import pad_model
from vllm_moe_offload.cli.tiny_models import make_tiny_model

FACTOR = 3


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("pad")
    src = make_tiny_model("mixtral", root / "src")
    dst = root / "padded"
    assert main(["pad-model", str(src), str(dst), "--factor", str(FACTOR), "--no-progress"]) == 0
    return src, dst


def _logits(folder, ids):
    import torch
    import transformers

    # the grouped-matmul experts kernel has no float64 path; the eager loop has
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=torch.float64, experts_implementation="eager"
    )
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]  # [T, vocab]


def test_padded_logits_equal_the_source(models):
    src, dst = models
    ids = PROMPTS[0]
    before, after = _logits(src, ids), _logits(dst, ids)
    # The extra units add exact zeros; only the summation order of longer dot
    # products differs, which float64 makes negligible.
    assert (before - after).abs().max().item() < 1e-12  # exactly 0.0 here
    assert before.std().item() > 1e-2  # the comparison is not between two constant tensors
    assert before.argmax(-1).tolist() == after.argmax(-1).tolist()


def test_padded_tensors_config_and_files(models):
    from safetensors import safe_open

    src, dst = models
    config = json.loads((dst / "config.json").read_text())
    inter = json.loads((src / "config.json").read_text())["intermediate_size"]
    assert config["intermediate_size"] == FACTOR * inter
    for name in ("tokenizer.json", "tokenizer_config.json", "pad_model.json"):
        assert (dst / name).exists()
    name = "model.layers.1.block_sparse_moe.experts.3.{}.weight"
    with safe_open(str(src / "model.safetensors"), "pt") as a, safe_open(str(dst / "model.safetensors"), "pt") as b:
        for proj in ("w1", "w3"):
            old, new = a.get_tensor(name.format(proj)), b.get_tensor(name.format(proj))
            assert new.shape == (FACTOR * inter, old.shape[1])
            assert new[:inter].equal(old)
            extra_std, old_std = new[inter:].float().std().item(), old.float().std().item()
            assert 0.8 < extra_std / old_std < 1.25  # random rows at the same scale
        old, new = a.get_tensor(name.format("w2")), b.get_tensor(name.format("w2"))
        assert new.shape == (old.shape[0], FACTOR * inter)
        assert new[:, :inter].equal(old) and not new[:, inter:].any()
        gate = "model.layers.1.block_sparse_moe.gate.weight"
        assert a.get_tensor(gate).equal(b.get_tensor(gate))


def test_sharded_output_and_refusals(tmp_path, models):
    src, _ = models
    out = tmp_path / "sharded"
    report = pad_model(src, out, 2, shard_bytes=2**20, progress=False)
    assert len(report["shards"]) > 1 and (out / "model.safetensors.index.json").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(report["shards"])
    with pytest.raises(FileExistsError):
        pad_model(src, out, 2, progress=False)
    llama = make_tiny_model("llama", tmp_path / "llama")
    with pytest.raises(ValueError, match="not a Mixtral-format MoE"):
        pad_model(llama, tmp_path / "llama-padded", 2, progress=False)


@pytest.mark.engine
def test_vllm_greedy_tokens_unchanged(tmp_path):
    """Stock vLLM (bf16 kernels) gives the trained tiny-pymoe and its padded copy the same greedy tokens."""
    padded = tmp_path / "tiny-pymoe-x4"
    pad_model(TINY_PYMOE, padded, 4, progress=False)
    heldout = np.load(TINY_PYMOE / "heldout-tokens.npy")
    prompts = [[1, *heldout[start:start + 16].tolist()] for start in (0, 4096, 8192, 16384)]  # <s> + held-out text
    jobs = [
        {"name": name, "model": str(model), "prompts": prompts, "max_tokens": 32}
        for name, model in (("source", TINY_PYMOE), ("padded", padded))
    ]
    results = run_engines(tmp_path / "engines", jobs, stock=True)
    assert results["padded"]["tokens"] == results["source"]["tokens"]
