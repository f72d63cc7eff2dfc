"""Measurement (not a test): how fast batch-1 decode gets when the policy knows the future.

    python scripts/measure/perfect_policy.py MODEL --tokens TOKENS.npy --budget 25% \\
      [--store kernel --cache-dir DIR] [--depths 1,2,3] [--rounds 3] [--out DIR]

Each variant runs in a fresh process holding one in-process engine (vLLM's ``LLM``; the patches
below reach its worker only in-process), greedy, 128 tokens after a 32-token prompt, ``--rounds``
prompts after a 4-token warm-up:

- ``stock``: no offload, every expert resident (the compute floor of this hour);
- ``policy``: the configured offload (default ``lru`` with the shared pool), recording every MoE call's
  expert ids in call order;
- ``belady``: the same routing replayed: the shared pool evicts the expert whose next use in the
  recording is farthest (Belady's rule over every (layer, expert));
- ``oracle dD``: the policy's own replacement, plus a prefetch of exactly the experts each MoE call
  ``D`` calls later will need (a perfect predictor ``D`` layers ahead);
- ``belady + oracle dD``: both.

Greedy tokens equal stock's, so every run routes as the recorded one; each replayed call checks it
(a mismatch stops the run). So ``belady + oracle`` is what a policy with perfect knowledge gets on
this machine, with the engine's loader, slots and kernel: the ceiling of any replacement and
prediction, against which the bench's physical bound (which assumes reads cost the compute nothing
and overlap perfectly) can be read. Needs the shared pool (``pool=shared``, the CPU default).
Writes ``perfect-policy.json``, ``perfect-policy.md`` and ``perfect-policy.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the patches below must reach the worker

NEW_TOKENS = 128
PROMPT_TOKENS = 32
STAT_KEYS = ("loads", "misses", "prefetch_loads", "prefetch_hits", "prefetch_unused", "prefetch_cancelled", "stall_s")


def _patch_replay(recording: list[tuple[int, list[list[int]]]], depth: int, belady: bool, window: int = 0,
                  backlog: int = 0) -> None:
    """Make the offloaded layers replay ``recording``: check each call's ids, prefetch ``depth`` calls
    ahead (0: none), and with ``belady`` evict by the recorded next use; ``window`` (with ``belady``):
    the aggressive schedule over the next ``window`` calls, at most ``backlog`` loads ahead queued or
    running (0: no limit) (:func:`_aggressive_prefetch`)."""
    from vllm_moe_offload.core import shared_pool
    from vllm_moe_offload.integration import experts

    position = [0]  # index of the next MoE call
    layers: dict[int, experts.OffloadRoutedExperts] = {}
    original = experts.OffloadRoutedExperts.offloaded_forward

    def offloaded_forward(self, x, topk_weights, topk_ids):
        n = position[0]
        position[0] += 1
        layers[self.layer_idx] = self
        want_layer, want_ids = recording[n]
        if want_layer != self.layer_idx or want_ids != topk_ids.tolist():
            raise SystemExit(f"MoE call {n} (layer {self.layer_idx}) did not route as recorded: the replay is void")
        if window:
            self.slots.begin_layer()  # its own loads first; the prefetches below queue behind them
            _aggressive_prefetch(n, window, recording, layers, ordinal_layer, next_use, backlog)
        elif depth:
            self.slots.begin_layer()  # its own loads first; the prefetches below queue behind them
            for distance in range(1, depth + 1):
                if n + distance < len(recording):
                    layer, ids = recording[n + distance]
                    later = layers.get(layer)
                    if later is not None and later is not self:
                        later.slots.prefetch(sorted({e for row in ids for e in row}), distance=distance)
        return original(self, x, topk_weights, topk_ids)

    experts.OffloadRoutedExperts.offloaded_forward = offloaded_forward
    if not belady:
        return
    ordinal_layer = sorted({layer for layer, _ in recording})  # the pool's views are the offloaded layers in order
    uses: dict[tuple[int, int], list[int]] = {}
    for n, (layer, ids) in enumerate(recording):
        for expert in {e for row in ids for e in row}:
            uses.setdefault((layer, expert), []).append(n)

    def next_use(layer: int, expert: int, now: int) -> int:
        """The first recorded call at or after ``now`` that needs ``expert`` of ``layer`` (far away: never)."""
        times = uses.get((layer, expert), [])
        i = bisect.bisect_left(times, now)
        return times[i] if i < len(times) else 1 << 60

    def choose_victim(pool, requester, pinned, spare_useful=False):
        now = position[0] - 1
        best = None
        for view in pool.views:
            if view.ordinal == pool.current and requester != pool.current:
                continue
            held = view.loading()
            layer = ordinal_layer[view.ordinal]
            for expert in view.resident_keys():
                if expert in held or (view.ordinal == requester and expert in pinned):
                    continue
                key = (next_use(layer, expert, now), -view.ordinal, -expert)
                if best is None or key > best:
                    best = key
        return None if best is None else (-best[1], -best[2])

    shared_pool.SharedPool.choose_victim = choose_victim


def _aggressive_prefetch(n: int, window: int, recording, layers: dict, ordinal_layer: list, next_use,
                         backlog: int = 0) -> None:
    """Cao et al.'s *aggressive* schedule with perfect knowledge, at MoE call ``n`` (before it computes).

    The missing experts the next ``window`` calls need, soonest first: each is loaded now (queued behind
    the running layer's own loads, in the order they are needed) while the pool's victim, Belady's
    (the resident used farthest in the future), is next used after it; the first that would evict an
    expert needed sooner, or that finds no room for another load in flight, ends the round. So it reads
    no expert whose victim is needed before it, and starts every load as early as that allows.
    ``backlog`` (loads; 0: no limit): the round also ends once that many loads ahead are queued or
    running, so that a victim is chosen when its slot is about to be read into, as the schedule does
    (queued far ahead, a load takes its slot early and a nearer need may evict it before its use).
    """
    seen: set[tuple[int, int]] = set()
    for m in range(n + 1, min(len(recording), n + 1 + window)):
        layer, ids = recording[m]
        later = layers.get(layer)
        if later is None:  # not seen yet (the first token): nothing to hand the load to
            continue
        slots = later.slots
        pool = slots.slot_map.pool
        for expert in sorted({e for row in ids for e in row}):
            if (layer, expert) in seen or slots.slot_map.slot_of(expert) is not None or slots.in_flight([expert]):
                continue
            seen.add((layer, expert))
            if backlog and slots.engine.prefetch_backlog_bytes() >= backlog * slots.expert_bytes:
                return
            if not pool.free_slots():
                victim = pool.choose_victim(slots.slot_map.ordinal, (), False)
                if victim is None or next_use(ordinal_layer[victim[0]], victim[1], n + 1) <= m:
                    return
            before = slots.stats.prefetch_loads
            slots.prefetch([expert], distance=m - n, predictor="layer-ahead")  # scored apart from the routers
            if slots.stats.prefetch_loads == before:  # refused: no room for another load in flight
                return


def _time_moe_op(split: dict) -> None:
    """Add up, per MoE call: the offloaded op's wall time, its kernel's, and its stall on loads."""
    from vllm_moe_offload.integration import experts

    forward, kernel = experts.OffloadRoutedExperts.offloaded_forward, experts.OffloadRoutedExperts._kernel

    def timed_forward(self, *args):
        stall = self.slots.stats.stall_s
        started = time.perf_counter()
        try:
            return forward(self, *args)
        finally:
            split["moe_op_s"] += time.perf_counter() - started
            split["stall_s"] += self.slots.stats.stall_s - stall

    def timed_kernel(self, *args):
        started = time.perf_counter()
        try:
            return kernel(self, *args)
        finally:
            split["kernel_s"] += time.perf_counter() - started

    experts.OffloadRoutedExperts.offloaded_forward = timed_forward
    experts.OffloadRoutedExperts._kernel = timed_kernel


def run_variant(args: argparse.Namespace, variant: str, recording_path: Path) -> dict:
    """One variant in this process: the engine, the warm-up, ``args.rounds`` timed decodes."""
    import numpy as np
    from vllm import LLM, SamplingParams

    offload = {"policy": args.policy, "budget": args.budget, "pool": "shared", **json.loads(args.offload_extra)}
    if args.store:
        offload["store"] = args.store
    if args.cache_dir:
        offload["cache_dir"] = args.cache_dir
    record = variant == "policy"
    recording: list[tuple[int, list[list[int]]]] = []
    if variant not in ("stock", "policy"):
        depth = int(variant.rsplit("d", 1)[1]) if "oracle" in variant else 0
        window = int(variant.rsplit("w", 1)[1]) if "aggressive" in variant else 0
        _patch_replay(pickle.loads(recording_path.read_bytes()), depth, belady=variant.startswith("belady"),
                      window=window, backlog=args.backlog)
    elif record:
        from vllm_moe_offload.integration import experts

        original = experts.OffloadRoutedExperts.offloaded_forward

        def recording_forward(self, x, topk_weights, topk_ids):
            recording.append((self.layer_idx, topk_ids.tolist()))
            return original(self, x, topk_weights, topk_ids)

        experts.OffloadRoutedExperts.offloaded_forward = recording_forward
    split = {"moe_op_s": 0.0, "kernel_s": 0.0, "stall_s": 0.0}
    if variant != "stock":
        _time_moe_op(split)
    llm = LLM(
        args.model, dtype="bfloat16", max_model_len=1024, kv_cache_memory_bytes=2**28, enforce_eager=True, seed=0,
        additional_config={} if variant == "stock" else {"moe_offload": offload},
    )
    tokens = np.load(args.tokens).astype(int)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    llm.generate([{"prompt_token_ids": tokens[:4].tolist()}], params, use_tqdm=False)

    def totals() -> dict:
        if variant == "stock":
            return {}
        stats = llm.collective_rpc("moe_offload_stats")[0]
        return stats.get("total", stats)

    before, times, outputs = totals(), [], []
    split.update(dict.fromkeys(split, 0.0))  # the warm-up's share out
    for r in range(args.rounds):
        start = 8 + 300 * r
        prompt = {"prompt_token_ids": tokens[start:start + PROMPT_TOKENS].tolist()}
        started = time.perf_counter()
        out = llm.generate([prompt], params, use_tqdm=False)
        times.append((time.perf_counter() - started) / NEW_TOKENS * 1e3)
        outputs.append(list(out[0].outputs[0].token_ids))
    after = totals()
    if record:
        recording_path.write_bytes(pickle.dumps(recording))
    per_token = {} if variant == "stock" else {k[:-2] + "_ms": v * 1e3 / (NEW_TOKENS * args.rounds) for k, v in split.items()}
    if per_token:
        per_token["bookkeeping_ms"] = per_token["moe_op_ms"] - per_token["kernel_ms"] - per_token["stall_ms"]
        per_token["outside_moe_ms"] = statistics.mean(times) - per_token["moe_op_ms"]
    return {
        "variant": variant, "ms_per_token": times, "median_ms_per_token": statistics.median(times), "split": per_token,
        "tokens": outputs,
        "stats": {k: after[k] - before.get(k, 0) for k in STAT_KEYS if isinstance(after.get(k), (int, float))},
    }


def plot(results: list[dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["variant"] for r in results]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 1.2))
    ax.barh(names, [r["median_ms_per_token"] for r in results], color="tab:blue")
    for r, y in zip(results, range(len(results))):
        ax.plot(r["ms_per_token"], [y] * len(r["ms_per_token"]), "k.", markersize=4)
    ax.invert_yaxis()
    ax.set_xlabel("ms per generated token (bar: median of rounds; dots: each round)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--tokens", required=True, help=".npy of token ids; prompts are cut from it")
    parser.add_argument("--budget", default="25%")
    parser.add_argument("--policy", default="lru", help="the offload policy whose routing is recorded and replayed")
    parser.add_argument("--store", default="kernel")
    parser.add_argument("--cache-dir")
    parser.add_argument("--offload-extra", default="{}", help="more offload settings, as JSON")
    parser.add_argument("--depths", default="1,2,3", help="oracle look-ahead depths, in MoE calls")
    parser.add_argument("--windows", default="",
                        help="also Belady with the aggressive schedule over this many MoE calls ahead (e.g. 8,16)")
    parser.add_argument("--backlog", type=int, default=0,
                        help="the aggressive schedule's most loads ahead queued or running at once (0: no limit)")
    parser.add_argument("--variants", default="",
                        help="run only these variants (comma-separated names; stock and policy always run)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("perfect-policy"))
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant, print its JSON
    parser.add_argument("--recording", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.variant:
        print("RESULT " + json.dumps(run_variant(args, args.variant, args.recording)), flush=True)
        return 0

    depths = [int(d) for d in args.depths.split(",") if d]
    windows = [int(w) for w in args.windows.split(",") if w]
    variants = (["stock", "policy", "belady"] + [f"oracle d{d}" for d in depths]
                + [f"belady + oracle d{d}" for d in depths] + [f"belady + aggressive w{w}" for w in windows])
    if args.variants:
        keep = {v.strip() for v in args.variants.split(",")}
        variants = [v for v in variants if v in ("stock", "policy") or v in keep]
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        recording = Path(tmp) / "routing.pkl"
        for i, variant in enumerate(variants, 1):
            print(f"[{i}/{len(variants)}] {variant} ...", end=" ", flush=True)
            cmd = [sys.executable, __file__, *(sys.argv[1:] if argv is None else argv), "--variant", variant,
                   "--recording", str(recording)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
                raise SystemExit(f"variant {variant!r} failed (exit {proc.returncode})")
            result = json.loads(line[len("RESULT "):])
            results.append(result)
            print(f"{result['median_ms_per_token']:.2f} ms/token", flush=True)
    stock = results[0]
    for r in results[1:]:
        r["tokens_equal_stock"] = r["tokens"] == stock["tokens"]
    for r in results:
        del r["tokens"]
    rows = ["| variant | ms/token, median (rounds) | x stock | loads | prefetched | misses | MoE kernel | stall | "
            "other MoE-op work | outside the MoE op |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        s = r["stats"]
        rounds = ", ".join(f"{t:.2f}" for t in r["ms_per_token"])
        rows.append(
            f"| {r['variant']} | {r['median_ms_per_token']:.2f} ({rounds}) | "
            f"{r['median_ms_per_token'] / stock['median_ms_per_token']:.2f} | {s.get('loads', '-')} | "
            f"{s.get('prefetch_loads', '-')} | {s.get('misses', '-')} | "
            + " | ".join(f"{r['split'][k]:.2f}" if k in r["split"] else "-"
                         for k in ("kernel_ms", "stall_ms", "bookkeeping_ms", "outside_moe_ms")) + " |"
        )
    rows.append("")
    rows.append("The last four columns: ms per generated token, the mean over the rounds (MoE kernel: the "
                "offloaded op's kernel calls; stall: its waits for loads; other MoE-op work: the rest of the op; "
                "outside the MoE op: everything else of the step).")
    title = (f"{Path(args.model).name}, {args.policy} at {args.budget}, batch-1 decode: "
             f"what perfect knowledge of the routing buys")
    (args.out / "perfect-policy.md").write_text(f"# {title}\n\n" + "\n".join(rows) + "\n")
    (args.out / "perfect-policy.json").write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "results": results}, indent=1, default=str))
    plot(results, title, args.out / "perfect-policy.png")
    print("\n".join(rows))
    if not all(r.get("tokens_equal_stock", True) for r in results):
        print("warning: some variant's tokens differ from stock's", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
