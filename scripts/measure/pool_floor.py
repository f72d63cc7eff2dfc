"""Measurement (not a test): the engine's loads in a prefill or a batch against the fewest its pool allows.

    python scripts/measure/pool_floor.py MODEL --tokens TOKENS.npy --budget 25% \\
      [--store kernel --cache-dir DIR] [--workload prefill|batch] [--rounds 8] [--json OUT]

The bench scores a run against the loads of the optimal cache of its organisation (``cli/bench_bound.py``):
for the default shared pool (``core/shared_pool.py``), one optimal cache of the pool's slots over every
(layer, expert), each step's experts of a layer held together (``pooled_routing_loads``). This script runs
the configured policy in one in-process engine (greedy, after a 4-token warm-up), records every MoE call's
distinct experts in call order (the engine's own calls: a prompt's chunks, a batch's steps) with the loads
every layer started during it, and replays the recording through:

- ``pool floor``: that optimal shared pool (Belady's rule over every (layer, expert), warm with the experts
  needed first, as the bench's floor starts);
- ``per-layer floor``: the optimal cache of ``pool slots / layers`` slots for each layer alone
  (``optimal_loads``), the floor of a run with a pool per layer, for comparison;

and prints the engine's loads against them: in all, prefetched, evicted unused, and for the batch the
prompts' calls and the decode steps apart. Workloads: ``prefill``, ``--rounds`` prompts of
``--prompt-len`` tokens and one generated token each; ``batch``, ``--batch`` prompts of ``--prompt-len``
tokens generating ``--new-tokens`` each, ``--rounds`` times. Tokens come from ``--tokens`` (a flat array
of token ids), 1000 apart. ``--offload-extra`` adds offload settings (JSON), for example
``'{"layer_ahead": false}'``.

On the padded tiny-mixtral (tm-x16, 32 slots at 25%, lru, 8 prompts of 512 tokens): the engine loaded
84.5 experts per prefill, the pool floor is 76.2 and the per-layer floor 67.9 (``docs/bench/pool-floor/``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the recording hook must reach the worker

from vllm_moe_offload.cli.bench_bound import optimal_loads, optimal_misses  # noqa: E402

#: a call's experts: (MoE layer index, its distinct experts)
Call = tuple[int, list[int]]

#: prompts start this many tokens apart in ``--tokens`` (or a prompt's length apart, if longer)
PROMPT_STRIDE = 1000

#: calls of more rows than this are a prompt's (a prefill or its chunk); the others a decode step's
DECODE_MAX_ROWS = 64


def pool_floor(calls: Sequence[Call], num_experts: int, slots: int) -> list[int]:
    """Per call, the loads of the optimal shared pool of ``slots`` (each call's experts held together, warm):
    the bench's I/O floor for a shared-pool run (``cli/bench_bound.pooled_routing_loads``), over the calls as
    the engine made them (a prompt's chunks, a batch's steps)."""
    layers = max(layer for layer, _ in calls) + 1
    keyed = [{layer * num_experts + e for e in experts} for layer, experts in calls]
    return optimal_misses(keyed, layers * num_experts, slots)


def per_layer_floor(calls: Sequence[Call], num_layers: int, num_experts: int, slots_per_layer: int) -> int:
    """The floor of a run with a pool per layer: each layer's optimal cache of ``slots_per_layer`` slots, warm."""
    by_layer: dict[int, list[set[int]]] = {}
    for layer, experts in calls:
        by_layer.setdefault(layer, []).append(set(experts))
    return sum(optimal_loads(steps, num_experts, slots_per_layer, warm=True) for steps in by_layer.values())


def run(args: argparse.Namespace) -> dict:
    """The engine, the warm-up and the rounds; the recording and the loads per round."""
    import numpy as np
    from vllm import LLM, SamplingParams

    from vllm_moe_offload.integration import experts as offload_experts

    calls: list[Call] = []
    rows: list[int] = []  # each call's rows
    engine_loads: list[int] = []  # the loads every layer started during each call (its own, and prefetches)
    layers: dict[int, object] = {}
    original = offload_experts.OffloadRoutedExperts.offloaded_forward

    def loads_started() -> int:
        return sum(layer.slots.stats.loads for layer in layers.values())

    def recording_forward(self, x, topk_weights, topk_ids):
        layers[self.layer_idx] = self
        calls.append((self.layer_idx, sorted(set(topk_ids.flatten().tolist()))))
        rows.append(x.shape[0])
        before = loads_started()
        try:
            return original(self, x, topk_weights, topk_ids)
        finally:
            engine_loads.append(loads_started() - before)

    offload_experts.OffloadRoutedExperts.offloaded_forward = recording_forward
    offload = {"policy": args.policy, "budget": args.budget, "pool": "shared", **json.loads(args.offload_extra)}
    if args.store:
        offload["store"] = args.store
    if args.cache_dir:
        offload["cache_dir"] = args.cache_dir
    batch = args.batch if args.workload == "batch" else 1
    llm = LLM(
        args.model, dtype="bfloat16", max_model_len=args.prompt_len + args.new_tokens + 16, max_num_seqs=batch,
        kv_cache_memory_bytes=2**28, enforce_eager=True, enable_prefix_caching=False, seed=0,
        additional_config={"moe_offload": offload},
    )
    tokens = np.load(args.tokens).astype(int).ravel()
    stride = max(PROMPT_STRIDE, args.prompt_len)
    if (args.rounds * batch - 1) * stride + args.prompt_len > len(tokens):
        raise SystemExit(f"{args.tokens} has {len(tokens)} tokens: too few for {args.rounds * batch} prompts of "
                         f"{args.prompt_len} tokens {stride} apart; give fewer --rounds, a smaller --batch or "
                         "more tokens")
    new = 1 if args.workload == "prefill" else args.new_tokens
    params = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True)
    llm.generate([{"prompt_token_ids": tokens[:4].tolist()}], SamplingParams(max_tokens=4), use_tqdm=False)

    def counts() -> dict[str, int]:
        per_layer = llm.collective_rpc("moe_offload_stats")[0]["layers"]
        return {key: sum(layer[key] for layer in per_layer) for key in ("loads", "prefetch_loads", "prefetch_unused")}

    def loads() -> int:
        return counts()["loads"]

    stats = llm.collective_rpc("moe_offload_stats")[0]
    # every offloaded layer's share of the pool, summed: the pool's slots (the shared pool's are one set)
    slots = int(stats["total"]["slots"]) if stats.get("pool") == "shared" else None
    num_experts = int(stats["num_experts"])
    first = counts()
    calls.clear()
    rows.clear()
    engine_loads.clear()
    rounds = []
    for r in range(args.rounds):
        start_call, start_loads = len(calls), loads()
        prompts = [
            {"prompt_token_ids": tokens[(r * batch + i) * stride:(r * batch + i) * stride + args.prompt_len].tolist()}
            for i in range(batch)
        ]
        started = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        rounds.append({"seconds": time.perf_counter() - started, "loads": loads() - start_loads,
                       "calls": len(calls) - start_call})
        print(f"round {r + 1}/{args.rounds}: {rounds[-1]['seconds'] * 1e3:.0f} ms, {rounds[-1]['loads']} loads",
              file=sys.stderr, flush=True)
    last = counts()
    return {
        "counts": {key: last[key] - first[key] for key in last}, "calls": calls, "rows": rows,
        "engine_loads": engine_loads, "rounds": rounds, "slots": slots, "num_experts": num_experts,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="model directory (a MoE model vLLM serves)")
    parser.add_argument("--tokens", required=True, help=".npy of token ids the prompts are cut from")
    parser.add_argument("--budget", default="25%", help="the expert budget (default 25%%)")
    parser.add_argument("--policy", default="lru", help="the offload policy (default lru)")
    parser.add_argument("--store", default=None, help="the expert store (kernel, ...; default the policy's)")
    parser.add_argument("--cache-dir", default=None, help="where stores are kept")
    parser.add_argument("--offload-extra", default="{}",
                        help='more offload settings as JSON, e.g. \'{"layer_ahead": false}\' (default none)')
    parser.add_argument("--workload", choices=("prefill", "batch"), default="prefill")
    parser.add_argument("--prompt-len", type=int, default=512, help="tokens per prompt (default 512)")
    parser.add_argument("--batch", type=int, default=32, help="requests per round of --workload batch (default 32)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per request, batch (default 32)")
    parser.add_argument("--rounds", type=int, default=8, help="prompts (prefill) or batches (default 8)")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.prompt_len < 1 or args.batch < 1 or args.new_tokens < 1:
        parser.error("--rounds, --prompt-len, --batch and --new-tokens must be at least 1")

    result = run(args)
    calls, rounds, num_experts = result["calls"], result["rounds"], result["num_experts"]
    num_layers = len({layer for layer, _ in calls})
    slots = result["slots"]
    if slots is None:
        parser.error("the engine did not report its pool's slots (needs the shared pool)")
    engine = sum(r["loads"] for r in rounds)
    pool_calls = pool_floor(calls, num_experts, slots)
    pool = sum(pool_calls)
    per_layer = per_layer_floor(calls, num_layers, num_experts, slots // num_layers)
    n = len(rounds)
    unit = "prefill" if args.workload == "prefill" else "batch"
    print(f"{args.model} {args.workload}, {args.policy} at {args.budget}: {slots} slots for {num_layers} layers x "
          f"{num_experts} experts, {n} rounds, {len(calls)} MoE calls")
    print(f"loads per {unit}: engine {engine / n:.1f}; pool floor (the bench's) {pool / n:.1f} "
          f"(engine x{engine / pool:.2f}); per-layer floor {per_layer / n:.1f} (pool floor x{pool / per_layer:.2f})")
    counted = result["counts"]
    print(f"  the engine's loads: {counted['prefetch_loads'] / n:.1f} per {unit} prefetched, "
          f"{counted['prefetch_unused'] / n:.1f} of them evicted unused")
    if args.workload == "batch":  # the prompts' calls and the decode steps' apart (loads started during them)
        for kind, prompt in (("prompts", True), ("decode steps", False)):
            mine = [i for i, r in enumerate(result["rows"]) if (r > DECODE_MAX_ROWS) == prompt]
            own = sum(result["engine_loads"][i] for i in mine)
            best = sum(pool_calls[i] for i in mine)
            print(f"  {kind}: {len(mine)} calls, engine {own / n:.1f} loads per batch, pool floor {best / n:.1f}"
                  + (f" (engine x{own / best:.2f})" if best else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "workload": args.workload, "policy": args.policy, "budget": args.budget,
                       "slots": slots, "layers": num_layers, "experts": num_experts, "rounds": rounds,
                       "loads": {"engine": engine, "pool_floor": pool, "per_layer_floor": per_layer}}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
