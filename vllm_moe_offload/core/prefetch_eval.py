"""Prediction quality without a cache: trace views (batches, warm-up split) and a K sweep.

``rebatch_trace`` regroups a trace's tokens into steps of ``B`` tokens (the
many-tokens-per-step regime Klotski targets); ``split_trace`` cuts it into a
warm-up part (the first steps) and the rest, so a predictor learns only from
rows that ran before the ones it is scored on. ``prefetch_accuracy`` scores one
predictor at one ``K`` over every step and layer; ``prefetch_sweep`` runs the
grid behind ``vllm-moe-offload simulate --prefetch-sweep``.

Scores, per layer and summed (the simulator's definitions): **precision** =
predicted experts the step used / predicted (Klotski's "prefetched hot experts
used"); **recall** = predicted experts the step used / the step's distinct experts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from vllm_moe_offload.core.correlation import CorrelationTable
from vllm_moe_offload.core.predictors import Predictor, make_predictor
from vllm_moe_offload.core.traces import Trace


def rebatch_trace(trace: Trace, batch: int) -> Trace:
    """``trace`` with its rows, in step order (file order within a step), cut into steps of ``batch`` rows.

    Consecutive decode tokens of the same sequence can land in one step when the
    trace has fewer than ``batch`` sequences running; the last step may be short.
    """
    if batch < 1:
        raise ValueError(f"batch must be at least 1 token, got {batch}")
    order = np.argsort(trace.step_ids, kind="stable")
    steps = np.empty(trace.num_tokens, dtype=np.int32)
    steps[order] = np.arange(trace.num_tokens) // batch
    return _subset(replace(trace, step_ids=steps), order)


def split_trace(trace: Trace, fraction: float) -> tuple[Trace | None, Trace]:
    """``(warm-up, rest)``: the steps that hold the first ``fraction`` of the rows, and the others.

    The cut falls on a step boundary (a step is never split); ``fraction`` 0
    gives no warm-up. Raises ``ValueError`` for a fraction outside ``[0, 1)``
    or when nothing would be left to evaluate.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"warm-up fraction must lie in [0, 1), got {fraction}")
    if fraction == 0.0:
        return None, trace
    steps = trace.step_rows()
    sizes = np.cumsum([len(s) for s in steps])
    cut = int(np.searchsorted(sizes, fraction * trace.num_tokens, side="left")) + 1
    if cut >= len(steps):
        raise ValueError(f"a warm-up of {fraction:.0%} leaves no step of the trace to evaluate")
    warm = np.concatenate(steps[:cut])
    rest = np.concatenate(steps[cut:])
    return _subset(trace, np.sort(warm)), _subset(trace, np.sort(rest))


def _subset(trace: Trace, rows: np.ndarray) -> Trace:
    """The rows ``rows`` of ``trace``, in that order (metadata kept)."""
    return replace(
        trace,
        topk_ids=trace.topk_ids[rows],
        topk_weights=trace.topk_weights[rows],
        token_ids=trace.token_ids[rows],
        seq_ids=trace.seq_ids[rows],
        positions=trace.positions[rows],
        step_ids=trace.step_ids[rows],
        hidden=None if trace.hidden is None else trace.hidden[rows],
    )


def prefetch_accuracy(trace: Trace, predictor: Predictor) -> dict:
    """Precision and recall of ``predictor`` (its ``top_n`` is K) over ``trace``'s steps, per layer and in all."""
    num_layers = trace.num_trace_layers
    predicted = np.zeros(num_layers, dtype=np.int64)
    used = np.zeros(num_layers, dtype=np.int64)
    needed = np.zeros(num_layers, dtype=np.int64)
    predictor.reset(trace)
    steps = trace.step_rows()
    last_step = {int(s): i for i, rows in enumerate(steps) for s in trace.seq_ids[rows].tolist()}
    for step_no, rows in enumerate(steps):
        predictor.begin_step(step_no, rows)
        for layer in range(num_layers):
            guess = list(dict.fromkeys(predictor.predict(step_no, layer)))[: predictor.top_n]
            routing = trace.topk_ids[rows, layer]  # [T, k]
            distinct = set(routing.ravel().tolist())
            predicted[layer] += len(guess)
            used[layer] += len(distinct.intersection(guess))
            needed[layer] += len(distinct)
            predictor.observe(step_no, layer, routing)
        for seq in sorted({int(s) for s in trace.seq_ids[rows].tolist() if last_step[int(s)] == step_no}):
            predictor.end_sequence(seq)
    return {
        "precision": _ratio(used.sum(), predicted.sum()),
        "recall": _ratio(used.sum(), needed.sum()),
        "predicted": int(predicted.sum()),
        "used": int(used.sum()),
        "needed": int(needed.sum()),
        "steps": len(steps),
        "per_layer": [
            {"layer_idx": int(trace.meta.layer_ids[i]), "precision": _ratio(used[i], predicted[i]),
             "recall": _ratio(used[i], needed[i])}
            for i in range(num_layers)
        ],
    }


def _ratio(num: int, den: int) -> float | None:
    return float(num) / float(den) if den else None


def prefetch_sweep(
    trace: Trace,
    predictors: Sequence[str],
    ks: Sequence[int],
    batches: Sequence[int],
    warmup: float = 0.0,
    profile: CorrelationTable | None = None,
) -> dict:
    """Precision and recall for every batch size, predictor and K; a JSON-ready report.

    For each batch size the trace is regrouped (``rebatch_trace``), then split
    (``split_trace``): predictors learn from the warm-up (and ``corr`` from
    ``profile``) and are scored on the rest, still learning online as they go.
    """
    results = []
    for batch in batches:
        warm, rest = split_trace(rebatch_trace(trace, batch), warmup)
        for name in predictors:
            for k in ks:
                predictor = make_predictor(name, k, warmup=warm, profile=profile)
                results.append({"batch": batch, "predictor": name, "k": k, **prefetch_accuracy(rest, predictor)})
    meta = trace.meta
    return {
        "trace": {"name": trace.name(), "path": trace.path, "model": meta.model, "num_experts": meta.num_experts,
                  "top_k": meta.top_k, "layer_ids": list(meta.layer_ids), "num_tokens": trace.num_tokens},
        "warmup_fraction": warmup,
        "profile": bool(profile is not None),
        "definitions": {
            "precision": "predicted experts the step used, over predicted (summed over steps and layers)",
            "recall": "predicted experts the step used, over the step's distinct experts",
            "batch": "trace rows regrouped into steps of this many tokens, in step order",
        },
        "results": results,
    }
