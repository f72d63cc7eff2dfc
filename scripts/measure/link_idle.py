"""Micro-benchmark (not a test): how busy the link is while the MoE layers run, for prefills and batches.

    python scripts/measure/link_idle.py MODEL --policies "lru[store=kernel;layer_ahead=off],lru[store=kernel]" \\
        --budget 25% [--rounds 3] [--json OUT]

Each run starts one engine in its own process (vLLM's one-process engine, so the MoE layers and the loader
thread are timed where they run) and times two workloads, ``--reps`` times each: a prefill of one
``--prompt-len``-token prompt (1 token generated), and a batch of ``--batch`` such prompts generating
``--new-tokens`` each, submitted together. Every expert load (its start and end on the I/O thread) and every
offloaded layer's MoE op are recorded, and per workload it reports the wall time, the time from the first
MoE op's start to the last one's end (*MoE span*), the link's busy and idle time within it, the kernel time,
the loads and those made ahead, and the next-layer fill's precision (``integration/layer_ahead.py``: of the
experts it loaded ahead, the share the next layer needed). A link that idles while layers wait for their
loads is time no replacement rule wins back (``docs/bench/layer-ahead/``). Runs alternate ``--rounds``
times; each figure is the median over rounds of each engine's median.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

# this folder's (the script's own directory is on sys.path)
from engine_child import check_args, run_child, short, time_loads

#: held-out tokens of the trained tiny-mixtral beside the repository (../shared), never copied into it
HELDOUT = Path(__file__).resolve().parents[3] / "shared" / "models" / "tiny-mixtral-heldout-tokens.npy"

FIELDS = ("wall_ms", "span_ms", "busy_ms", "idle_ms", "kernel_ms", "loads", "ahead", "precision")


def _idle_within(loads: list[tuple[float, float]], start: float, end: float) -> float:
    """Seconds of [start, end] that no load in ``loads`` (start, end pairs) covers."""
    idle, covered_to = 0.0, start
    for a, b in sorted(loads):
        if b <= covered_to:
            continue
        if a > covered_to:
            idle += min(a, end) - covered_to
        covered_to = max(covered_to, b)
        if covered_to >= end:
            break
    return idle + max(0.0, end - covered_to)


def _child(spec: dict) -> dict:
    """One engine: time the workloads and return their figures (runs in its own process)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import numpy as np
    from vllm import LLM, SamplingParams

    import vllm_moe_offload
    from vllm_moe_offload.integration import experts

    events: dict[str, list] = {"loads": [], "ops": [], "kernel": []}
    time_loads(lambda started, ended: events["loads"].append((started, ended)))

    def timed(method, key):
        def wrapper(self, *args):
            started = time.perf_counter()
            try:
                return method(self, *args)
            finally:
                events[key].append((started, time.perf_counter()))
        return wrapper

    cls = experts.OffloadRoutedExperts
    cls.offloaded_forward = timed(cls.offloaded_forward, "ops")
    cls._kernel = timed(cls._kernel, "kernel")

    extra = {"additional_config": {"moe_offload": spec["offload"]}}
    llm = LLM(spec["model"], dtype="bfloat16", max_model_len=spec["prompt_len"] + spec["new_tokens"] + 16,
              max_num_seqs=spec["batch"], kv_cache_memory_bytes=2**28, enforce_eager=True, seed=0, **extra)
    tokens = np.load(spec["tokens"]).astype(np.int64).ravel().tolist()
    count = spec["reps"] * (1 + spec["batch"])
    stride = len(tokens) // count
    prompts = iter({"prompt_token_ids": tokens[i * stride:i * stride + spec["prompt_len"]]} for i in range(count))
    llm.generate([{"prompt_token_ids": tokens[:8]}], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)

    def totals() -> dict:
        layers = vllm_moe_offload.offload_stats(llm)[0].get("layers", [])
        keys = ("loads", "prefetch_loads", "layer_ahead_predicted", "layer_ahead_right")
        return {key: sum(layer[key] for layer in layers) for key in keys}

    out: dict[str, list[dict]] = {"prefill": [], "batch": []}
    for _ in range(spec["reps"]):
        for workload, size, new in (("prefill", 1, 1), ("batch", spec["batch"], spec["new_tokens"])):
            batch = [next(prompts) for _ in range(size)]
            params = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True)
            for key in events:
                events[key].clear()
            before = totals()
            started = time.perf_counter()
            llm.generate(batch, params, use_tqdm=False)
            wall_s = time.perf_counter() - started
            after = totals()
            first, last = min(a for a, _ in events["ops"]), max(b for _, b in events["ops"])
            loads = [(a, b) for a, b in events["loads"] if b > first and a < last]
            busy = sum(min(b, last) - max(a, first) for a, b in loads)
            predicted = after["layer_ahead_predicted"] - before["layer_ahead_predicted"]
            right = after["layer_ahead_right"] - before["layer_ahead_right"]
            out[workload].append({
                "wall_ms": wall_s * 1e3, "span_ms": (last - first) * 1e3, "busy_ms": busy * 1e3,
                "idle_ms": _idle_within(loads, first, last) * 1e3,
                "kernel_ms": sum(b - a for a, b in events["kernel"]) * 1e3,
                "loads": after["loads"] - before["loads"],
                "ahead": after["prefetch_loads"] - before["prefetch_loads"],
                "precision": right / predicted if predicted else float("nan"),
            })
    return {workload: {key: statistics.median(r[key] for r in runs) for key in FIELDS}
            for workload, runs in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a MoE checkpoint folder (e.g. a pad-model copy of tiny-mixtral)")
    parser.add_argument("--policies", default="lru[layer_ahead=off],lru",
                        help="bench-style entries, NAME or NAME[key=value;...] (default: lru without and with "
                        "the next-layer fill)")
    parser.add_argument("--budget", default="25%", help="the runs' budget (default 25%%)")
    parser.add_argument("--tokens", type=Path, default=HELDOUT, help="a .npy of token ids the prompts are cut from")
    parser.add_argument("--prompt-len", type=int, default=512, help="tokens per prompt (default 512)")
    parser.add_argument("--batch", type=int, default=32, help="prompts of the batch workload (default 32)")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per batch prompt (default 32)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions of each workload per engine (default 3)")
    parser.add_argument("--rounds", type=int, default=3, help="times each engine is started, alternating (default 3)")
    parser.add_argument("--json", type=Path, help="also write every round's figures here")
    args = parser.parse_args()
    check_args(args, "link_idle", ("prompt_len", "batch", "new_tokens", "reps", "rounds"))

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from vllm_moe_offload.cli.bench import policy_settings, split_policies

    try:
        runs = [(short(entry), {**policy_settings(entry), "budget": args.budget})
                for entry in split_policies(args.policies)]
    except ValueError as exc:
        raise SystemExit(f"link_idle: {exc}") from None
    common = {"model": str(Path(args.model).resolve()), "tokens": str(args.tokens.resolve()),
              "prompt_len": args.prompt_len, "batch": args.batch, "new_tokens": args.new_tokens, "reps": args.reps}
    results: dict[str, list[dict]] = {name: [] for name, _ in runs}
    total = args.rounds * len(runs)
    for n in range(total):
        name, offload = runs[n % len(runs)]
        print(f"[{n + 1}/{total}] {name} {args.budget} ...", end=" ", flush=True)
        started = time.perf_counter()
        got = run_child("link_idle", {**common, "name": name, "offload": offload})
        results[name].append(got)
        print(f"prefill {got['prefill']['wall_ms']:.0f} ms, batch {got['batch']['wall_ms']:.0f} ms "
              f"({time.perf_counter() - started:.0f} s)", flush=True)

    print(f"\nmedians of {args.rounds} engines, each the median of {args.reps} repetitions; prefill: one "
          f"{args.prompt_len}-token prompt; batch: {args.batch} x ({args.prompt_len} + {args.new_tokens}); "
          f"budget {args.budget}; times in ms\n")
    print("| workload | run | wall | MoE span | link busy | link idle in span | kernels | loads | loaded ahead "
          "| ahead needed |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for workload in ("prefill", "batch"):
        for name, rounds in results.items():
            med = {key: statistics.median(r[workload][key] for r in rounds) for key in FIELDS}
            walls = [r[workload]["wall_ms"] for r in rounds]
            precision = "-" if med["precision"] != med["precision"] else f"{med['precision']:.2f}"
            print(f"| {workload} | {name} | {med['wall_ms']:.0f} ({min(walls):.0f}-{max(walls):.0f}) "
                  f"| {med['span_ms']:.0f} | {med['busy_ms']:.0f} | {med['idle_ms']:.0f} | {med['kernel_ms']:.0f} "
                  f"| {med['loads']:.0f} | {med['ahead']:.0f} | {precision} |")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": results},
                                        indent=1))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
