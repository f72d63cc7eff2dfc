"""``vllm-moe-offload trace`` records vLLM's real routing: checked against the checkpoint's own gates."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO, TINY_PYMOE, engine_env
from vllm_moe_offload.core.traces import load_trace

pytestmark = pytest.mark.engine

PROMPT_LINES = ["def add(a, b):", "import os", "class Parser:"]
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trace")
    prompts = tmp / "prompts.txt"
    prompts.write_text("\n".join(PROMPT_LINES) + "\n")
    out = tmp / "tiny.npz"
    # With offload on (LRU at 25%): the recorder must see through the offloaded layer.
    cmd = [sys.executable, "-m", "vllm_moe_offload.cli.trace", str(TINY_PYMOE), "--prompts", str(prompts),
           "--out", str(out), "--max-tokens", str(MAX_TOKENS), "--ignore-eos", "--hidden",
           "--save-profile", str(tmp / "profile.npz"),
           "--moe-offload", "lru", "--moe-offload-budget", "25%"]
    proc = subprocess.run(cmd, env=engine_env(tmp, stock=False), cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "wrote" in proc.stdout
    return load_trace(out), tmp / "profile.npz"


def test_trace_layout(trace):
    trace, _ = trace
    meta = trace.meta
    assert (meta.num_experts, meta.top_k, meta.layer_ids) == (16, 2, tuple(range(6)))
    assert meta.seq_names == tuple(PROMPT_LINES)
    assert meta.expert_bytes == 3 * 128 * 64 * 2
    assert trace.hidden is not None and trace.hidden.shape == (trace.num_tokens, 6, 128)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(TINY_PYMOE))
    for seq, line in enumerate(PROMPT_LINES):
        rows = trace.sequence_rows(seq)
        prompt = tokenizer(line)["input_ids"]
        # every prompt token, then the generated ones (the last sampled token is never fed back)
        assert trace.positions[rows].tolist() == list(range(len(prompt) + MAX_TOKENS - 1))
        assert trace.token_ids[rows][: len(prompt)].tolist() == prompt
    # the first step is the prefill of all prompts; later steps decode one token per sequence
    steps = trace.step_rows()
    assert len(steps[0]) == sum(len(tokenizer(line)["input_ids"]) for line in PROMPT_LINES)
    assert all(len(rows) == len(PROMPT_LINES) for rows in steps[1:])


def test_topk_ids_match_the_checkpoint_gates(trace):
    trace, _ = trace
    """topk(x @ W_gate^T) from the recorded router inputs gives the recorded experts."""
    import torch
    from safetensors import safe_open

    with safe_open(str(TINY_PYMOE / "model.safetensors"), "pt") as f:
        for column, layer_idx in enumerate(trace.meta.layer_ids):
            gate = f.get_tensor(f"model.layers.{layer_idx}.block_sparse_moe.gate.weight").float()  # [E, H]
            hidden = torch.from_numpy(trace.hidden[:, column].astype(np.float32))  # [N, H]
            logits = hidden @ gate.T  # [N, E]
            top = logits.topk(3, dim=-1)
            expected = np.sort(top.indices[:, :2].numpy(), axis=1)
            recorded = np.sort(trace.topk_ids[:, column].astype(np.int64), axis=1)
            same = (expected == recorded).all(axis=1)
            # vLLM computes the gate in bf16: only near-ties between 2nd and 3rd may flip
            clear = (top.values[:, 1] - top.values[:, 2]).numpy() > 0.05
            assert same[clear].all(), f"layer {layer_idx}: rows {np.flatnonzero(clear & ~same)} differ"
            assert same.mean() >= 0.95
            # weights: softmax over all experts, top-2 renormalized (Mixtral)
            probs = torch.softmax(logits, dim=-1).gather(1, torch.from_numpy(trace.topk_ids[:, column].astype(np.int64)))
            probs = probs / probs.sum(-1, keepdim=True)
            np.testing.assert_allclose(probs.numpy()[same], trace.topk_weights[:, column][same], atol=0.03)


def test_the_trace_profile_counts_every_token(trace):
    from vllm_moe_offload.core.correlation import load_profile

    trace, profile = trace
    table = load_profile(profile, (trace.num_trace_layers, trace.meta.num_experts, trace.meta.top_k))
    assert table.tokens_seen == trace.num_tokens
    assert table.counts.sum() == trace.num_tokens * trace.num_trace_layers * trace.meta.top_k
