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


class ForesightPool(SharedPool):
    """The shared pool's rule told each resident's next ``horizon`` uses exactly (an oracle, not a policy).

    A resident used within the next ``horizon`` runs of its layer is scored by that use, in MoE layers from
    now; one that is not, by the pool's estimate from counts beyond them. How far ahead a predictor would have
    to see for the pool to approach Belady's cache: ``horizon`` 1 is a perfect prediction of every layer's
    next step.
    """

    def __init__(self, ids: np.ndarray, slots: int, horizon: int) -> None:
        super().__init__(ids.shape[1], int(ids.max()) + 1, slots * ids.shape[1], ids.shape[2])
        self.ids, self.horizon, self.t = ids, horizon, 0  # the replay sets ``t``, the token being served

    def choose_victim(self, requester, pinned, spare_useful=False):
        best = None
        for view in self.views:
            ordinal = view.ordinal
            if ordinal == self.current and requester != self.current:
                continue
            until = (ordinal - self.current - 1) % self.num_layers + 1
            first = self.t if ordinal > self.current else self.t + 1  # the token its layer serves next
            for expert in view.resident_keys():
                if ordinal == requester and expert in pinned:
                    continue
                ahead = [h for h in range(self.horizon) if first + h < len(self.ids)
                         and expert in self.ids[first + h, ordinal]]
                if ahead:
                    next_use = until + ahead[0] * self.num_layers
                elif first + self.horizon >= len(self.ids):
                    next_use = float("inf")  # not needed again in this sequence
                else:
                    next_use = self.horizon * self.num_layers + self._next_use(ordinal, expert, 0.0)
                key = (next_use, -ordinal, -expert)
                if best is None or key > best:
                    best = key
        return None if best is None else (-best[1], -best[2])


def foresight(seqs, slots: int, horizon: int) -> int:
    """Misses of :class:`ForesightPool` (one cold pool per sequence, as :func:`shared`)."""
    misses = 0
    for ids in seqs:
        pool = ForesightPool(ids, slots, horizon)
        for view in pool.views:
            view.attach(LRUPolicy(pool.num_experts, slots))
        for t in range(len(ids)):
            pool.t = t
            for layer in range(ids.shape[1]):
                pool.begin_layer(layer)
                misses += serve_step(pool.view(layer), [int(e) for e in ids[t, layer]])
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
    parser.add_argument("--foresight", default="", metavar="H[,H...]",
                        help="also replay the shared pool told each resident's next H uses exactly (an oracle: "
                        "how far ahead a predictor must see); e.g. 1,2,4")
    args = parser.parse_args(argv)
    trace = read_shared_jsonl(args.trace) if args.trace.endswith(".jsonl") else load_trace(args.trace)
    seqs = sequences(trace)
    experts = int(trace.topk_ids.max()) + 1
    tokens = sum(len(ids) for ids in seqs)
    rows = []
    print(f"{args.trace}: {len(seqs)} sequences, {tokens} tokens, {trace.topk_ids.shape[1]} layers x {experts} "
          f"experts, top-{trace.topk_ids.shape[2]}; misses per token")
    toks = sequence_tokens(trace)
    horizons = [int(h) for h in args.foresight.split(",") if h.strip()]
    print("share  slots/layer  lru/layer  decay/layer  belady/layer  shared(counts)  shared  belady/shared"
          + "".join(f"  foresight {h}" for h in horizons))
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
            **{f"foresight_{h}": foresight(seqs, slots, h) / tokens for h in horizons},
        }
        rows.append(row)
        print(f"{text:>5}  {slots:>11}  {row['lru_layer']:9.2f}  {row['decay_layer']:11.2f}  "
              f"{row['belady_layer']:12.2f}  {row['shared_counts']:14.2f}  {row['shared']:6.2f}  {row['belady_shared']:13.2f}"
              + "".join(f"  {row[f'foresight_{h}']:11.2f}" for h in horizons))
    if args.json:
        args.json.write_text(json.dumps({"trace": args.trace, "tokens": tokens, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
