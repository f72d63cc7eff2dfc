"""Micro-benchmark (not a test): what an expert's first read in a process costs, its crc32 check included.

    python scripts/measure/first_reads.py MODEL --policy "lru[store=kernel]" --budget 25% [--prefills 4] [--json OUT]

First the CRC-32 alone: ``runtime/crc.py``'s (ISA-L's where installed) against zlib's, on buffers of one
expert of MODEL and of 96 MiB, the median of 5. Then one engine (vLLM's one-process engine, a fresh process)
runs ``--prefills`` prefills of ``--prompt-len`` tokens each, one after the other, on different prompts
(1 token generated): the first reads most of its experts for the first time in the process, so it checks
their crc32; the later ones mostly read experts that were checked before. Per prefill: its wall time, its
loads, and the median time of a load on the I/O thread against the median of its ``preadv`` calls (the read
itself; the rest is the check and the slot's bookkeeping). For an A/B of two checkouts (``PYTHONPATH``), run
it from a folder outside both: the engine's process puts its working folder first on its path.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import zlib
from pathlib import Path

# this folder's (the script's own directory is on sys.path)
from engine_child import check_args, run_child, short, time_loads

#: held-out tokens of the trained tiny-mixtral beside the repository (../shared), never copied into it
HELDOUT = Path(__file__).resolve().parents[3] / "shared" / "models" / "tiny-mixtral-heldout-tokens.npy"


def _crc_rates(sizes: dict[str, int]) -> list[dict]:
    """Each crc32 on each buffer size: the median of 5 (a buffer just written, so partly in the CPU's caches,
    unlike a read's, which lands by DMA)."""
    functions = [("zlib", zlib.crc32)]
    try:
        from vllm_moe_offload.runtime import crc
    except ImportError:  # a checkout from before runtime/crc.py (zlib's only), for an A/B run
        pass
    else:
        functions.insert(0, (f"runtime/crc.py ({crc.IMPLEMENTATION})", crc.crc32))
    rows = []
    for label, size in sizes.items():
        data = os.urandom(size)
        for name, fn in functions:
            times = []
            for _ in range(5):
                started = time.perf_counter()
                fn(data)
                times.append(time.perf_counter() - started)
            ms = statistics.median(times) * 1e3
            rows.append({"buffer": label, "crc32": name, "ms": ms, "gb_s": size / ms / 1e6})
    return rows


def _child(spec: dict) -> dict:
    """One engine: time the prefills (runs in its own process)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import numpy as np
    from vllm import LLM, SamplingParams

    loads: list[float] = []
    reads: list[float] = []
    real_preadv = os.preadv

    def preadv(fd, buffers, offset, *rest):
        started = time.perf_counter()
        try:
            return real_preadv(fd, buffers, offset, *rest)
        finally:
            reads.append(time.perf_counter() - started)

    os.preadv = preadv  # the loaders call os.preadv at each read
    time_loads(lambda started, ended: loads.append(ended - started))
    llm = LLM(spec["model"], dtype="bfloat16", max_model_len=spec["prompt_len"] + 16, max_num_seqs=1,
              kv_cache_memory_bytes=2**28, enforce_eager=True, seed=0,
              additional_config={"moe_offload": spec["offload"]})
    tokens = np.load(spec["tokens"]).astype(np.int64).ravel().tolist()
    stride = len(tokens) // (spec["prefills"] + 1)
    llm.generate([{"prompt_token_ids": tokens[:8]}], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    out = []
    for i in range(1, spec["prefills"] + 1):
        loads.clear()
        reads.clear()
        started = time.perf_counter()
        llm.generate([{"prompt_token_ids": tokens[i * stride:i * stride + spec["prompt_len"]]}], params,
                     use_tqdm=False)
        wall = time.perf_counter() - started
        out.append({"prefill": i, "wall_ms": wall * 1e3, "loads": len(loads),
                    "load_ms": statistics.median(loads) * 1e3 if loads else float("nan"),
                    "read_ms": statistics.median(reads) * 1e3 if reads else float("nan")})
    return {"prefills": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a MoE checkpoint folder (e.g. a pad-model copy of tiny-mixtral)")
    parser.add_argument("--policy", default="lru[store=kernel]", help="a bench-style entry (default lru[store=kernel])")
    parser.add_argument("--budget", default="25%", help="the run's budget (default 25%%)")
    parser.add_argument("--tokens", type=Path, default=HELDOUT, help="a .npy of token ids the prompts are cut from")
    parser.add_argument("--prompt-len", type=int, default=512, help="tokens per prompt (default 512)")
    parser.add_argument("--prefills", type=int, default=4, help="prefills, one after the other (default 4)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    check_args(args, "first_reads", ("prompt_len", "prefills"))
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from vllm_moe_offload.cli.bench import policy_settings

    try:
        offload = {**policy_settings(args.policy), "budget": args.budget}
    except ValueError as exc:
        raise SystemExit(f"first_reads: {exc}") from None
    with open(Path(args.model) / "config.json") as f:
        config = json.load(f)
    sizes = {"96 MiB": 96 * 2**20}
    inner = config.get("moe_intermediate_size") or config.get("intermediate_size")
    if inner and config.get("hidden_size"):  # bf16 gate, up and down projections
        sizes = {"one expert of the model": 3 * config["hidden_size"] * inner * 2, **sizes}
    crc_rows = _crc_rates(sizes)
    print("| buffer | crc32 | ms | GB/s |\n| --- | --- | ---: | ---: |")
    for row in crc_rows:
        print(f"| {row['buffer']} | {row['crc32']} | {row['ms']:.2f} | {row['gb_s']:.2f} |")
    spec = {"name": short(args.policy), "model": str(Path(args.model).resolve()), "offload": offload,
            "tokens": str(args.tokens.resolve()),
            "prompt_len": args.prompt_len, "prefills": args.prefills}
    print(f"\n{short(args.policy)} {args.budget}, {args.prefills} prefills of {args.prompt_len} tokens in one "
          "engine, one after the other; times in ms\n", flush=True)
    result = run_child("first_reads", spec)
    print("| prefill | wall | loads | load (median) | its read (median) |\n| ---: | ---: | ---: | ---: | ---: |")
    for row in result["prefills"]:
        print(f"| {row['prefill']} | {row['wall_ms']:.0f} | {row['loads']} | {row['load_ms']:.2f} | "
              f"{row['read_ms']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"crc32": crc_rows, **result, "spec": spec}, indent=1))


if __name__ == "__main__":
    main()
