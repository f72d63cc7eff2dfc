"""Fate's ranking of predicted experts from a router's logits (``experts.predicted_experts``)."""

from __future__ import annotations

import pytest
import torch

from vllm_moe_offload.integration.experts import predicted_experts


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("overfetch", [2, 5, 16])
def test_one_token_fast_path_ranks_as_the_batch_rule(seed, overfetch):
    """A batch of copies of one token ranks exactly as that token alone (the decode fast path)."""
    torch.manual_seed(seed)
    logits = torch.randn(1, 16, dtype=torch.bfloat16)  # [T, E], the router's dtype
    one = predicted_experts(logits, top_k=2, overfetch=overfetch, limit=6)
    batch = predicted_experts(logits.repeat(3, 1), top_k=2, overfetch=overfetch, limit=6)
    assert one == batch
    assert len(one) == min(max(2, overfetch), 6)
    assert one[:2] == logits[0].float().topk(2).indices.tolist()


def test_batch_puts_the_most_needed_first_and_covers_every_token():
    logits = torch.full((3, 8), -5.0)
    logits[0, [1, 2]] = 4.0  # token 0: experts 1, 2
    logits[1, [2, 5]] = 4.0  # token 1: experts 2, 5
    logits[2, [2, 7]] = 4.0  # token 2: experts 2, 7
    logits[:, 3] = 1.0  # nobody's top-2, the most probable of the rest
    got = predicted_experts(logits, top_k=2, overfetch=2, limit=8)
    assert got[0] == 2 and set(got) == {1, 2, 5, 7}  # the union of top-2, at least the over-fetch
    assert predicted_experts(logits, top_k=2, overfetch=5, limit=8)[4] == 3  # filled by probability
    assert len(predicted_experts(logits, top_k=2, overfetch=5, limit=3)) == 3  # never more than the slots
