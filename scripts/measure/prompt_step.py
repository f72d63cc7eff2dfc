"""Micro-benchmark (not a test): where a one-request decode's prompt step goes, layer by layer, against stock.

    python scripts/measure/prompt_step.py MODEL --policy "lru[store=kernel]" --budget 3168MiB \\
        [--tokens HELDOUT.npy] [--prompt-len 32] [--new-tokens 32] [--no-waves] [--stock] [--json OUT]

Starts one engine in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``; vLLM's worker computes with the
threads of ``VLLM_CPU_OMP_THREADS_BIND``, default ``0-1``), runs the bench's warm-up request (8 prompt tokens,
4 generated), then the bench's decode workload (``--prompt-len`` held-out tokens, ``--new-tokens`` greedy
tokens), and prints, for each offloaded layer's call in the prompt step: its wall time, its kernel time and
calls, the distinct experts its rows need against the *expert passes* its kernel calls made (the waves of
``integration/passes.py`` compute rows as their experts land, so an expert shared by rows of two waves is
computed in both; ``kernel_beside_reads.py`` measures what that costs), its stall, its loads and their read
time per load (the I/O thread's, while the kernel computes beside it); then the decode steps' means per
token. ``--stock`` times stock vLLM's prompt step (the same prompt, one token, three times, the
prefix cache reset between) and its decode in the same process first, for reference.

``--no-waves`` is an ablation: every pass computes in one kernel call once all its loads have landed
(``_wave_pays`` answers no), so no expert is computed twice and no load overlaps a kernel call of its own
layer.

Measured on the 9 GiB model of the README's "Bigger than memory" (``docs/bench/prompt-step/``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")

from engine_child import add_engine_arguments, offload_settings  # noqa: E402 - this folder's (on sys.path as a script)

#: held-out tokens of the trained tiny-mixtral beside the repository (../shared), never copied into it
HELDOUT = Path(__file__).resolve().parents[3] / "shared" / "models" / "tiny-mixtral-heldout-tokens.npy"

_COUNTED = ("stall_s", "loads", "read_s", "kernel_s", "kernel_calls")


def _prompts(tokens: Path, prompt_len: int) -> tuple[list[int], list[int]]:
    """The bench's warm-up prompt (8 tokens) and decode prompt, cut from the start of ``tokens``."""
    import numpy as np

    stream = np.load(tokens).astype(np.int64).ravel().tolist()
    if len(stream) < 8 + prompt_len:
        raise SystemExit(f"{tokens} holds {len(stream)} tokens; 8 + {prompt_len} are needed")
    return stream[:8], stream[8:8 + prompt_len]


def _engine_args(model: str, prompt_len: int, new_tokens: int) -> dict:
    return {"model": model, "dtype": "bfloat16", "max_model_len": prompt_len + new_tokens + 16, "max_num_seqs": 4,
            "enforce_eager": True, "seed": 0, "kv_cache_memory_bytes": 2 ** 28}


def run_stock(args, warm: list[int], prompt: list[int]) -> dict:
    """Stock vLLM on the same prompt: its prompt step (one token) three times, then the decode workload."""
    import gc

    from vllm import LLM, SamplingParams

    llm = LLM(**_engine_args(args.model, args.prompt_len, args.new_tokens))
    llm.generate([{"prompt_token_ids": warm}], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True),
                 use_tqdm=False)
    steps = []
    for _ in range(3):
        started = time.perf_counter()
        llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True),
                     use_tqdm=False)
        steps.append(time.perf_counter() - started)
        llm.reset_prefix_cache()
    started = time.perf_counter()
    llm.generate([{"prompt_token_ids": prompt}],
                 SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True), use_tqdm=False)
    whole = time.perf_counter() - started
    step = statistics.median(steps)
    del llm
    gc.collect()
    return {"prompt_step_ms": step * 1e3, "prompt_steps_ms": [s * 1e3 for s in steps],
            "decode_ms_per_token": (whole - step) / max(args.new_tokens - 1, 1) * 1e3}


def run_offload(args, warm: list[int], prompt: list[int]) -> dict:
    from vllm import LLM, SamplingParams

    from vllm_moe_offload.integration import passes
    from vllm_moe_offload.integration.experts import OffloadRoutedExperts

    calls: list[dict] = []
    passes_now: dict[int, int] = {}

    kernel = OffloadRoutedExperts._kernel

    def counted_kernel(self, x, topk_weights, slot_ids):
        passes_now[self.layer_idx] = passes_now.get(self.layer_idx, 0) + len(set(slot_ids.flatten().tolist()))
        return kernel(self, x, topk_weights, slot_ids)

    forward = OffloadRoutedExperts.offloaded_forward

    def timed_forward(self, x, topk_weights, topk_ids):
        stats = self.slots.stats
        before = {name: getattr(stats, name) for name in _COUNTED}
        passes_now[self.layer_idx] = 0
        started = time.perf_counter()
        try:
            return forward(self, x, topk_weights, topk_ids)
        finally:
            wall = time.perf_counter() - started
            calls.append({"layer": self.layer_idx, "rows": int(x.shape[0]), "wall_s": wall,
                          "distinct": len(set(topk_ids.flatten().tolist())),
                          "expert_passes": passes_now[self.layer_idx],
                          **{name: getattr(stats, name) - before[name] for name in _COUNTED}})

    OffloadRoutedExperts._kernel = counted_kernel
    OffloadRoutedExperts.offloaded_forward = timed_forward
    if args.no_waves:
        passes.PassSchedule._wave_pays = lambda self, in_flight: False

    llm = LLM(**_engine_args(args.model, args.prompt_len, args.new_tokens),
              additional_config={"moe_offload": args.offload})
    llm.generate([{"prompt_token_ids": warm}], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True),
                 use_tqdm=False)
    calls.clear()
    started = time.perf_counter()
    llm.generate([{"prompt_token_ids": prompt}],
                 SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True), use_tqdm=False)
    wall = time.perf_counter() - started
    prompt_calls = [c for c in calls if c["rows"] > 1]
    decode_calls = [c for c in calls if c["rows"] == 1]
    layers = len({c["layer"] for c in calls}) or 1
    tokens = len(decode_calls) / layers
    per_token = {name: sum(c[name] for c in decode_calls) / tokens for name in ("wall_s", "stall_s", "kernel_s",
                                                                                 "loads")} if tokens else {}
    return {"wall_s": wall, "prompt_layers": prompt_calls, "decode_per_token": per_token, "decode_tokens": tokens}


def report(args, stock: dict | None, off: dict) -> None:
    print(f"\n{args.model}, {args.policy} at {args.budget}{' (ablation: no waves)' if args.no_waves else ''}; "
          f"{args.prompt_len}-token prompt, {args.new_tokens} tokens")
    if stock:
        print(f"stock: prompt step {stock['prompt_step_ms']:.1f} ms (median of "
              f"{', '.join(f'{s:.1f}' for s in stock['prompt_steps_ms'])}), decode "
              f"{stock['decode_ms_per_token']:.1f} ms per token")
    print("\nprompt step, per offloaded layer (ms):\n")
    print("| layer | rows | wall | kernel | kernel calls | distinct experts | expert passes | stall | loads | "
          "read per load |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    total = {"wall_s": 0.0, "kernel_s": 0.0, "stall_s": 0.0, "loads": 0, "read_s": 0.0, "distinct": 0,
             "expert_passes": 0, "kernel_calls": 0}
    for c in off["prompt_layers"]:
        per_load = f"{c['read_s'] / c['loads'] * 1e3:.1f}" if c["loads"] else "-"
        print(f"| {c['layer']} | {c['rows']} | {c['wall_s'] * 1e3:.1f} | {c['kernel_s'] * 1e3:.1f} | "
              f"{c['kernel_calls']} | {c['distinct']} | {c['expert_passes']} | {c['stall_s'] * 1e3:.1f} | "
              f"{c['loads']} | {per_load} |")
        for name in total:
            total[name] += c[name]
    if total["loads"]:
        print(f"| all | | {total['wall_s'] * 1e3:.1f} | {total['kernel_s'] * 1e3:.1f} | {total['kernel_calls']} | "
              f"{total['distinct']} | {total['expert_passes']} | {total['stall_s'] * 1e3:.1f} | {total['loads']} | "
              f"{total['read_s'] / total['loads'] * 1e3:.1f} |")
    d = off["decode_per_token"]
    if d:
        print(f"\ndecode ({off['decode_tokens']:.0f} tokens; the offloaded layers only): per token "
              f"{d['wall_s'] * 1e3:.1f} ms in the MoE ops, kernel {d['kernel_s'] * 1e3:.1f}, stall "
              f"{d['stall_s'] * 1e3:.1f}, {d['loads']:.2f} loads")
    print(f"whole request: {off['wall_s'] * 1e3:.0f} ms")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_arguments(parser)
    parser.add_argument("--tokens", type=Path, default=HELDOUT, help="a .npy of token ids the prompts are cut from")
    parser.add_argument("--prompt-len", type=int, default=32, help="tokens in the decode prompt (default 32)")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens generated (default 32)")
    parser.add_argument("--no-waves", action="store_true",
                        help="ablation: each pass computes in one kernel call once its loads have landed")
    parser.add_argument("--stock", action="store_true", help="time stock vLLM first, in the same process")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    args.offload = offload_settings(parser, args)
    if args.prompt_len < 2:
        parser.error("--prompt-len must be at least 2 (a one-token prompt is a decode step)")
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2")
    warm, prompt = _prompts(args.tokens, args.prompt_len)
    stock = run_stock(args, warm, prompt) if args.stock else None
    off = run_offload(args, warm, prompt)
    report(args, stock, off)
    if args.json:
        settings = {k: v if k == "offload" else str(v) for k, v in vars(args).items()}
        args.json.write_text(json.dumps({"args": settings, "stock": stock, "offload": off}, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
