"""How well a decode step's input token tells its experts, on routing traces (``core/token_routes.py``).

    python scripts/measure/token_routes.py TRACE [TRACE ...] [--share 25%] [--json OUT]

TRACE: a ``vllm-moe-offload trace`` file (.npz) or one of ``../shared/traces`` (.jsonl). Rows replay in
sequence and position order, the table learning from every row (a prompt's too) as it goes, and scored
on decode rows only (those past each sequence's prompt, where the trace says; a .jsonl decode trace is
all decode). Prints per trace:

* the precision of three ways to keep a token's routing per layer: the last one (what the engine keeps),
  a count over every earlier occurrence, and a count halving at each occurrence;
* two tokens ahead: the step after next predicted from the token that followed the just-sampled token the
  last time (a bigram of the tokens seen), then the table: how often that guess was the token, and the
  precision of the experts it gives (what a schedule loading two tokens ahead would have to work with,
  ``docs/bench/perfect-policy/``);
* batch-1 decode with one LRU cache per layer of ``share`` x experts slots, cold per sequence: demand
  misses per decode token without prefetch and with the table's prediction loaded before each decode
  token (evicting the least recently used expert it does not predict), with all the loads it takes.

For tiny-mixtral's routing (prompts of 32 tokens: ``--prompt-len 32``):

    vllm-moe-offload trace ../shared/models/tiny-mixtral --prompts ../shared/models/tiny-mixtral-heldout-tokens.npy \\
      --num-prompts 16 --prompt-len 32 --max-tokens 128 --ignore-eos --out tm-trace.npz
"""

from __future__ import annotations

import argparse
import json
from collections import OrderedDict

import numpy as np

from vllm_moe_offload.core.config import Budget
from vllm_moe_offload.core.token_routes import TokenRoutes
from vllm_moe_offload.core.traces import Trace, load_trace


def _rows(trace: Trace, prompt_len: int | None) -> list[tuple[int, list[list[int]], bool]]:
    """(token, routing [layer][k], decode?) per row, in sequence and position order."""
    order = np.lexsort((trace.positions, trace.seq_ids))
    decode = np.ones(len(order), dtype=bool) if prompt_len is None else trace.positions >= prompt_len
    return [(int(trace.token_ids[i]), trace.topk_ids[i].tolist(), bool(decode[i])) for i in order.tolist()]


def precision(rows, num_layers: int, keep: str) -> float:
    """Right over predicted experts of decode rows, a token's routing kept as ``keep``: last, count, halving."""
    counts: dict[tuple[int, int], dict[int, float]] = {}
    routes = TokenRoutes(num_layers, max_tokens=len(rows) + 1)
    right = total = 0
    for token, routing, decode in rows:
        for ordinal, experts in enumerate(routing):
            if keep == "last":
                predicted = routes.predict(ordinal, token)
                routes.observe(ordinal, [token], [experts])
            else:
                seen = counts.setdefault((ordinal, token), {})
                predicted = sorted(seen, key=lambda e: -seen[e])[: len(experts)]
                if keep == "halving":
                    for expert in seen:
                        seen[expert] /= 2
                for rank, expert in enumerate(experts):  # the top choice breaks ties
                    seen[expert] = seen.get(expert, 0.0) + 1.0 + (0.01 if rank == 0 else 0.0)
            if decode:
                right += len(set(predicted) & set(experts))
                total += len(predicted)
    return right / total if total else float("nan")


def two_ahead(rows, num_layers: int) -> dict:
    """The step after next's experts, told from the token that last followed the token the step before it
    processes (known when that step's predecessor sampled it); scored on decode rows."""
    routes = TokenRoutes(num_layers, max_tokens=len(rows) + 1)
    follow: dict[int, int] = {}  # token -> the token that followed it the last time
    guessed = guessed_right = right = total = 0
    for i, (token, routing, decode) in enumerate(rows):
        guess = follow.get(rows[i - 1][0]) if i else None
        if decode and guess is not None:
            guessed += 1
            guessed_right += guess == token
            for ordinal, experts in enumerate(routing):
                predicted = routes.predict(ordinal, guess)
                right += len(set(predicted) & set(experts))
                total += len(predicted)
        for ordinal, experts in enumerate(routing):
            routes.observe(ordinal, [token], [experts])
        if i:
            follow[rows[i - 1][0]] = token
    return {"token_guessed": guessed, "token_right": guessed_right,
            "precision": right / total if total else float("nan")}


def decode_misses(trace: Trace, rows, slots: int, prefetch: bool) -> dict:
    """Batch-1 decode through an LRU cache per layer, cold per sequence (see the module's docstring)."""
    routes = TokenRoutes(trace.meta.num_layers, max_tokens=len(rows) + 1)
    loads = misses = prefetched = used = decode_rows = 0
    caches: list[OrderedDict] = []
    seq = None
    order = np.lexsort((trace.positions, trace.seq_ids)).tolist()
    for i, (token, routing, decode) in zip(order, rows):
        if trace.seq_ids[i] != seq:
            seq, caches = trace.seq_ids[i], [OrderedDict() for _ in routing]
        decode_rows += decode
        for ordinal, experts in enumerate(routing):
            cache = caches[ordinal]
            if prefetch and decode:
                predicted = routes.predict(ordinal, token)
                for expert in predicted:
                    if expert not in cache:
                        if len(cache) >= slots:
                            victim = next((e for e in cache if e not in predicted), None)
                            if victim is None:
                                break
                            del cache[victim]
                        cache[expert] = True  # loaded ahead, not used yet
                        loads += 1
                        prefetched += 1
            for expert in experts:
                if expert in cache:
                    used += cache[expert] is True
                    cache[expert] = False
                    cache.move_to_end(expert)
                    continue
                if len(cache) >= slots:
                    del cache[next(e for e in cache if e not in experts)]
                cache[expert] = False
                loads += 1
                misses += decode
            routes.observe(ordinal, [token], [experts])
    return {"decode_tokens": decode_rows, "demand_misses_per_token": misses / decode_rows,
            "loads_per_token": loads / decode_rows, "prefetched": prefetched, "prefetched_used": used}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("traces", nargs="+")
    parser.add_argument("--share", default="25%", help="slots per layer as a share of its experts (default 25%%)")
    parser.add_argument("--prompt-len", type=int, default=None,
                        help="rows at positions below this are prompt rows: they teach, unscored (default: none)")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    share = Budget.parse(args.share)
    if share.fraction is None:
        parser.error(f"--share {args.share!r} must be a share of the experts, such as 25%")
    report = {}
    for path in args.traces:
        trace = load_trace(path)
        rows = _rows(trace, args.prompt_len)
        slots = max(trace.meta.top_k, round(share.fraction * trace.meta.num_experts))
        figures = {"slots_per_layer": slots,
                   "precision": {keep: precision(rows, trace.meta.num_layers, keep)
                                 for keep in ("last", "count", "halving")},
                   "two_ahead": two_ahead(rows, trace.meta.num_layers),
                   "lru": decode_misses(trace, rows, slots, prefetch=False),
                   "lru_with_table": decode_misses(trace, rows, slots, prefetch=True)}
        report[path] = figures
        plain, table = figures["lru"], figures["lru_with_table"]
        print(f"{path}: {slots} of {trace.meta.num_experts} slots per layer; precision "
              + ", ".join(f"{k} {v:.3f}" for k, v in figures["precision"].items())
              + f"; demand misses per decode token {plain['demand_misses_per_token']:.2f} -> "
              f"{table['demand_misses_per_token']:.2f}, loads {plain['loads_per_token']:.2f} -> "
              f"{table['loads_per_token']:.2f} ({table['prefetched_used']} of {table['prefetched']} prefetched used)")
        ahead = figures["two_ahead"]
        print(f"  two tokens ahead: the token guessed right {ahead['token_right']} of {ahead['token_guessed']} "
              f"times, the experts' precision {ahead['precision']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
