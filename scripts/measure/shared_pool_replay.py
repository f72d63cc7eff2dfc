"""Replay a routing trace through slot pools per layer and one shared pool: misses per token.

    python scripts/measure/shared_pool_replay.py TRACE [--shares 25%,50%] [--json OUT]

TRACE: a ``vllm-moe-offload trace`` file (.npz) or one of ``../shared/traces`` (.jsonl). Batch-1 view:
one cold cache per sequence, its rows in position order, each layer's step pinned while it is served (as
the engine serves a token). Per budget share (slots per layer = share x experts; the shared pool holds
all layers' shares): LRU and ``decay`` per layer, the shared pool's rule (``core/shared_pool.py``) on
counts only and, as the engine runs it, with its layers' ``nextuse`` predictions (told each token), and
the optimal cache of each organisation (Belady, cold start). For tiny-mixtral's routing:

    vllm-moe-offload trace ../shared/models/tiny-mixtral --prompts ../shared/models/tiny-mixtral-heldout-tokens.npy \\
      --num-prompts 8 --prompt-len 32 --max-tokens 128 --ignore-eos --out tm-trace.npz
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from vllm_moe_offload.cli.bench_bound import optimal_loads
from vllm_moe_offload.core.cache import LRUPolicy, SlotMap
from vllm_moe_offload.core.predictive import NextUsePolicy, link_layers
from vllm_moe_offload.core.replacement import make_policy
from vllm_moe_offload.core.shared_pool import SharedPool, serve_step
from vllm_moe_offload.core.traces import load_trace, read_shared_jsonl


def sequences(trace) -> list[np.ndarray]:
    """Each sequence's routing ``[T, L, k]`` in position order."""
    return [trace.topk_ids[rows] for rows in _rows(trace)]


def sequence_tokens(trace) -> list[np.ndarray]:
    """Each sequence's input token ids ``[T]`` in position order (as :func:`sequences`)."""
    return [trace.token_ids[rows] for rows in _rows(trace)]


def _rows(trace) -> list[np.ndarray]:
    out = []
    for seq in np.unique(trace.seq_ids):
        rows = np.flatnonzero(trace.seq_ids == seq)
        out.append(rows[np.argsort(trace.positions[rows])])
    return out


def per_layer(seqs, experts: int, slots: int, policy: str) -> int:
    misses = 0
    for ids in seqs:
        maps = [SlotMap(experts, slots, make_policy(policy, experts, slots, ids.shape[2])) for _ in range(ids.shape[1])]
        misses += sum(serve_step(maps[layer], [int(e) for e in ids[t, layer]])
                      for t in range(len(ids)) for layer in range(ids.shape[1]))
    return misses


def shared(seqs, experts: int, slots: int, tokens=None) -> int:
    """The shared pool's misses. With ``tokens`` (each sequence's), its layers' policies are ``nextuse`` as in
    the engine (told each step's token and needs, linked, their memories kept from one sequence to the next)
    and their predictions enter the pool's rule; without, LRU policies that predict nothing (counts only)."""
    misses = 0
    previous = None
    for n, ids in enumerate(seqs):
        layers = ids.shape[1]
        pool = SharedPool(layers, experts, slots * layers, ids.shape[2])
        policies = [NextUsePolicy(experts, slots) if tokens is not None else LRUPolicy(experts, slots)
                    for _ in range(layers)]
        for view, policy in zip(pool.views, policies):
            view.attach(policy)
        if tokens is not None:
            if previous is None:
                link_layers(policies, experts)
            else:
                for policy, before in zip(policies, previous):
                    policy.inherit(before)
            previous = policies
        for t in range(len(ids)):
            if tokens is not None:
                for policy in policies:
                    policy.begin_step_tokens([int(tokens[n][t])])
            for l in range(layers):
                needed = [int(e) for e in ids[t, l]]
                if tokens is not None:
                    policies[l].begin_pass_needs(needed)
                pool.begin_layer(l)
                misses += serve_step(pool.view(l), needed)
    return misses


def belady(seqs, experts: int, slots: int, pooled: bool) -> int:
    misses = 0
    for ids in seqs:
        layers = ids.shape[1]
        if pooled:
            needs = [{l * experts + int(e) for e in ids[t, l]} for t in range(len(ids)) for l in range(layers)]
            misses += optimal_loads(needs, layers * experts, slots * layers, warm=False)
        else:
            misses += sum(optimal_loads([set(map(int, ids[t, l])) for t in range(len(ids))], experts, slots,
                                        warm=False) for l in range(layers))
    return misses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trace")
    parser.add_argument("--shares", default="25%,50%", help="slots per layer as shares of its experts")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    trace = read_shared_jsonl(args.trace) if args.trace.endswith(".jsonl") else load_trace(args.trace)
    seqs = sequences(trace)
    experts = int(trace.topk_ids.max()) + 1
    tokens = sum(len(ids) for ids in seqs)
    rows = []
    print(f"{args.trace}: {len(seqs)} sequences, {tokens} tokens, {trace.topk_ids.shape[1]} layers x {experts} "
          f"experts, top-{trace.topk_ids.shape[2]}; misses per token")
    toks = sequence_tokens(trace)
    print("share  slots/layer  lru/layer  decay/layer  belady/layer  shared(counts)  shared  belady/shared")
    for text in args.shares.split(","):
        slots = max(trace.topk_ids.shape[2], round(experts * float(text.rstrip("%")) / 100))
        row = {
            "share": text, "slots_per_layer": slots,
            "lru_layer": per_layer(seqs, experts, slots, "lru") / tokens,
            "decay_layer": per_layer(seqs, experts, slots, "decay") / tokens,
            "belady_layer": belady(seqs, experts, slots, pooled=False) / tokens,
            "shared_counts": shared(seqs, experts, slots) / tokens,
            "shared": shared(seqs, experts, slots, toks) / tokens,
            "belady_shared": belady(seqs, experts, slots, pooled=True) / tokens,
        }
        rows.append(row)
        print(f"{text:>5}  {slots:>11}  {row['lru_layer']:9.2f}  {row['decay_layer']:11.2f}  "
              f"{row['belady_layer']:12.2f}  {row['shared_counts']:14.2f}  {row['shared']:6.2f}  {row['belady_shared']:13.2f}")
    if args.json:
        args.json.write_text(json.dumps({"trace": args.trace, "tokens": tokens, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
