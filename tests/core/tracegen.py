"""Small hand-made traces for the core tests (no files, no vLLM)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vllm_moe_offload.core.traces import Trace, TraceMeta


def make_trace(
    rows: Sequence[Sequence[Sequence[int]]],
    num_experts: int,
    seq_ids: Sequence[int] | None = None,
    step_ids: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
) -> Trace:
    """A trace from ``rows[token][layer] = expert ids`` (weights decreasing, 1/(rank+1)).

    Defaults: one sequence, each row its own step, positions 0, 1, 2, ...
    """
    topk_ids = np.array(rows, dtype=np.int16).reshape(len(rows), len(rows[0]), len(rows[0][0]))
    n, num_layers, top_k = topk_ids.shape
    weights = np.broadcast_to(1.0 / np.arange(1, top_k + 1, dtype=np.float32), topk_ids.shape).copy()
    seq = np.zeros(n, np.int32) if seq_ids is None else np.asarray(seq_ids, np.int32)
    if positions is None:
        positions = [int((seq[:i] == seq[i]).sum()) for i in range(n)]
    meta = TraceMeta(
        model="hand-made", num_layers=num_layers, num_experts=num_experts, top_k=top_k,
        layer_ids=tuple(range(num_layers)),
    )
    return Trace(
        meta=meta,
        topk_ids=topk_ids,
        topk_weights=weights,
        token_ids=np.arange(n, dtype=np.int32),
        seq_ids=seq,
        positions=np.asarray(positions, np.int32),
        step_ids=np.arange(n, dtype=np.int32) if step_ids is None else np.asarray(step_ids, np.int32),
    )


def one_layer(*token_experts: Sequence[int], num_experts: int) -> Trace:
    """One sequence, one layer: ``one_layer([0, 1], [2, 0], num_experts=4)``."""
    return make_trace([[list(t)] for t in token_experts], num_experts)
