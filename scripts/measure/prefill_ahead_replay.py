"""Replay sequences of prefills through the shared pool: what loading the next layer's experts ahead costs.

    vllm-moe-offload trace ../shared/models/tiny-mixtral --prompts ../shared/models/tiny-mixtral-heldout-tokens.npy \\
      --num-prompts 40 --prompt-len 512 --max-tokens 1 --ignore-eos --max-model-len 600 --out tm-prefill512.npz
    python scripts/measure/prefill_ahead_replay.py tm-prefill512.npz --slots 32,64

Each prompt is one step of every layer, the layer's distinct experts held together (as the engine holds a
prefill's). The pool's own rule (``core/shared_pool.py``, on counts) serves each layer; with ``ahead`` K,
while a layer runs (its experts pinned, the distances counted from it) the next layer's first K missing
experts are admitted too, told exactly (a perfect next-layer prediction, as ``integration/layer_ahead.py``
makes in the engine with the next router). Prints loads per prompt after the first ``--warm`` prompts, and
the optimal pool's (Belady's) per prompt over the whole sequence.
"""

from __future__ import annotations

import argparse

import numpy as np

from vllm_moe_offload.cli.bench_bound import optimal_loads
from vllm_moe_offload.core.cache import LRUPolicy
from vllm_moe_offload.core.shared_pool import SharedPool


def prompt_needs(ids: np.ndarray, seqs: np.ndarray) -> list[list[list[int]]]:
    """Each prompt's distinct experts per layer, from a trace's routing ``ids [rows, L, k]`` and ``seqs [rows]``."""
    return [[sorted(set(ids[seqs == s, layer].ravel().tolist())) for layer in range(ids.shape[1])]
            for s in np.unique(seqs)]


def replay(prompts: list[list[list[int]]], experts: int, top_k: int, slots: int, ahead: int) -> list[int]:
    """Loads per prompt of the pool's rule, loading up to ``ahead`` of the next layer's experts early."""
    layers = len(prompts[0])
    pool = SharedPool(layers, experts, slots, top_k)
    for view in pool.views:
        view.attach(LRUPolicy(experts, max(1, slots // layers)))
    loads = []
    for needs in prompts:
        count = 0
        for layer in range(layers):
            pool.begin_layer(layer)
            view = pool.view(layer)
            for expert in needs[layer]:
                if view.slot_of(expert) is None:
                    view.admit(expert, pinned=needs[layer])
                    count += 1
                view.touch(expert, hit=False)
            if layer + 1 < layers and ahead:
                nxt, early = pool.view(layer + 1), 0
                for expert in needs[layer + 1]:
                    if early == ahead:
                        break
                    if nxt.slot_of(expert) is None:
                        try:
                            nxt.admit(expert, pinned=needs[layer + 1])
                        except RuntimeError:  # every other slot is pinned
                            break
                        count += 1
                        early += 1
            view.end_step()
        loads.append(count)
    return loads


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trace", help="a vllm-moe-offload trace (.npz) of prefills, one sequence per prompt")
    parser.add_argument("--slots", default="32,64", help="pool sizes, comma-separated (default %(default)s)")
    parser.add_argument("--ahead", default="0,1,2,4,99", help="experts loaded ahead per layer (default %(default)s)")
    parser.add_argument("--warm", type=int, default=4, help="prompts left out of the means (default %(default)s)")
    args = parser.parse_args(argv)
    trace = np.load(args.trace)
    ids = trace["topk_ids"]
    prompts = prompt_needs(ids, trace["seq_ids"])
    experts, top_k, layers = int(ids.max()) + 1, ids.shape[2], ids.shape[1]
    print(f"{len(prompts)} prompts, {layers} layers x {experts} experts, "
          f"{np.mean([sum(map(len, p)) for p in prompts]):.1f} (layer, expert) pairs needed per prompt")
    for slots in map(int, args.slots.split(",")):
        needs = [{layer * experts + e for e in p[layer]} for p in prompts for layer in range(layers)]
        optimal = optimal_loads(needs, layers * experts, slots, warm=False) / len(prompts)
        row = ", ".join(f"{k} ahead {np.mean(replay(prompts, experts, top_k, slots, k)[args.warm:]):.1f}"
                        for k in map(int, args.ahead.split(",")))
        print(f"{slots} slots: loads per prompt: {row}; optimal pool {optimal:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
