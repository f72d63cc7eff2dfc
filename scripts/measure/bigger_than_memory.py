"""A model whose experts are twice the memory limit: stock vLLM against the plugin, each in a memory cgroup.

Usage (from the repository root, in .venv, as root: it makes cgroups and drops the page cache):
    python scripts/measure/bigger_than_memory.py [--factor 2048] [--limit 4.5GiB] [--out .scratch/big]

Pads the shipped models/tiny-pymoe (``pad-model --factor 2048``: 96 MiB experts, 9 GiB in all; made
once), then runs one engine at a time, each in a fresh memory cgroup of ``--limit`` (page cache
counted) after dropping the page cache: stock vLLM (``VLLM_PLUGINS=moe_offload_amx``), then the
plugin with ``--moe-offload-budget auto`` in the configurations below, and stock once more without
a limit for the reference tokens. Each engine prefills 32 held-out tokens and decodes 32 greedily.
Prints one JSON line per run: how it ended (exit code, OOM kills), the cgroup's peak memory, start-up
time, the time to first token and the decode rate after it, the tokens (compared with stock's), and the
slots ``auto`` gave each layer. Decode tok/s here is (tokens - 1) / (generate time - first-token time).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "models" / "tiny-pymoe"
PROMPT_TOKENS, NEW_TOKENS = 32, 32

#: (name, moe_offload settings or None for stock, multiprocess engine)
RUNS = [
    ("stock", None, True),
    ("lru auto", {"policy": "lru"}, True),
    ("lru auto, kernel store", {"policy": "lru", "store": "kernel"}, True),
    ("fate auto, kernel store", {"policy": "fate", "store": "kernel"}, True),
    ("lru auto, kernel store, in-process", {"policy": "lru", "store": "kernel"}, False),
]


def _child(model: str, offload: dict | None) -> dict:
    import numpy as np
    from vllm import LLM, SamplingParams

    import vllm_moe_offload

    started = time.perf_counter()
    extra = {"additional_config": {"moe_offload": offload}} if offload else {}
    llm = LLM(model, dtype="bfloat16", max_model_len=512, kv_cache_memory_bytes=64 * 2**20, enforce_eager=True,
              seed=0, **extra)
    startup_s = time.perf_counter() - started
    prompt = {"prompt_token_ids": [1] + np.load(SHIPPED / "heldout-tokens.npy").astype(int)[:PROMPT_TOKENS].tolist()}
    first = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    started = time.perf_counter()
    llm.generate([prompt], first, use_tqdm=False)
    ttft_s = time.perf_counter() - started
    started = time.perf_counter()
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True),
                       use_tqdm=False)
    generate_s = time.perf_counter() - started
    stats = vllm_moe_offload.offload_stats(llm)[0] if offload else {}
    return {
        "startup_s": round(startup_s, 1), "ttft_s": round(ttft_s, 2),
        "decode_tok_s": round((NEW_TOKENS - 1) / max(1e-9, generate_s - ttft_s), 3),
        "tokens": list(out[0].outputs[0].token_ids),
        "layer_slots": stats.get("layer_slots"), "budget_bytes": stats.get("budget_bytes"),
        "hit_rate": stats.get("total", {}).get("hit_rate"),
    }


def _run(name: str, model: Path, offload: dict | None, multiprocess: bool, limit_bytes: int | None, out: Path) -> dict:
    from vllm_moe_offload.cli.cgroup import evict_page_cache, run_limited

    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1" if multiprocess else "0",
               VLLM_CACHE_ROOT=str(out / "vllm-cache"), VLLM_RPC_BASE_PATH=str(out / "rpc"), TOKENIZERS_PARALLELISM="false")
    env.pop("VLLM_PLUGINS", None)
    if offload is None:
        env["VLLM_PLUGINS"] = "moe_offload_amx"  # stock vLLM, with only the plugin's AMX permission
    else:
        offload = {**offload, "cache_dir": str(out / "stores")}
    (out / "rpc").mkdir(parents=True, exist_ok=True)
    evict_page_cache([model])
    log = out / f"{name.replace(' ', '_').replace(',', '')}.log"
    try:
        with open(log, "w") as f:
            run = run_limited([sys.executable, __file__, "--child", str(model), json.dumps(offload)], limit_bytes,
                              timeout_s=3600, env=env, stdout=f, stderr=subprocess.STDOUT)
    except RuntimeError as exc:  # no cgroup can be made here
        raise SystemExit(f"bigger_than_memory: {exc}") from None
    result = {"name": name, "limit_gib": limit_bytes / 2**30 if limit_bytes else None, "ended": run.ended,
              "exit_code": run.exit_code, "oom_kills": run.oom_kills, "peak_gib": round(run.peak_bytes / 2**30, 2),
              "wall_s": run.wall_s, "log": str(log)}
    text = log.read_text()
    if run.exit_code == 0 and "RESULT " in text:
        result.update(json.loads(text.split("RESULT ", 1)[1].splitlines()[0]))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--factor", type=int, default=2048, help="pad-model factor for tiny-pymoe (default 2048)")
    parser.add_argument("--limit", default="4.5GiB", help="memory limit of each engine's cgroup (default 4.5GiB)")
    parser.add_argument("--out", type=Path, default=REPO / ".scratch" / "big", help="model copy, logs, stores")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(_child(args.child[0], json.loads(args.child[1]))), flush=True)
        return
    from vllm_moe_offload.core.config import Budget

    limit = Budget.parse(args.limit).num_bytes
    model = args.out / f"pymoe-x{args.factor}"
    if not (model / "config.json").exists():
        subprocess.run([sys.executable, "-m", "vllm_moe_offload.cli.main", "pad-model", str(SHIPPED), str(model),
                        "--factor", str(args.factor)], check=True)
    results = [_run(name, model, offload, mp, limit, args.out) for name, offload, mp in RUNS]
    reference = _run("stock, no limit", model, None, True, None, args.out)
    for result in [*results, reference]:
        if "tokens" in result:
            result["tokens_equal_stock"] = result["tokens"] == reference.get("tokens")
        print(json.dumps({k: v for k, v in result.items() if k != "tokens"}), flush=True)


if __name__ == "__main__":
    main()
