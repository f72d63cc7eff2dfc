"""Batch-1 decode time, stock vLLM against the plugin at a budget, repeated and alternated.

Usage (from the repository root, in .venv):
    python scripts/measure/decode_ab.py MODEL [--budget 100%] [--policy ondemand] [--rounds 2] [--reps 5]

Each round starts stock vLLM (``VLLM_PLUGINS=moe_offload_amx``: the plugin's AMX permission alone) and then the plugin, one
engine at a time in its own process, and times ``--reps`` decodes of 128 tokens
after a 32-token prompt (held-out tokens of the trained tiny-mixtral). A single
decode, as ``vllm-moe-offload bench`` measures, can be off by tens of percent
on a shared machine; this gives the spread.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

#: held-out tokens of the trained tiny model beside the repository (../shared), never copied into it
HELDOUT = Path(__file__).resolve().parents[3] / "shared" / "models" / "tiny-mixtral-heldout-tokens.npy"


def _child(model: str, offload: dict, reps: int) -> list[float]:
    import numpy as np
    from vllm import LLM, SamplingParams

    extra = {"additional_config": {"moe_offload": offload}} if offload else {}
    llm = LLM(model, dtype="bfloat16", max_model_len=512, kv_cache_memory_bytes=2**28, enforce_eager=True, seed=0,
              **extra)
    prompt = {"prompt_token_ids": np.load(HELDOUT).astype(int)[:32].tolist()}
    params = SamplingParams(temperature=0.0, max_tokens=128, ignore_eos=True)
    llm.generate([prompt], params, use_tqdm=False)  # warm-up
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        llm.generate([prompt], params, use_tqdm=False)
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="model folder, e.g. a pad-model copy of tiny-mixtral")
    parser.add_argument("--budget", default="100%")
    parser.add_argument("--policy", default="ondemand")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("TIMES " + json.dumps(_child(args.model, json.loads(args.child), args.reps)))
        return
    report = {"stock_s": [], "plugin_s": []}
    offload = {"policy": args.policy, "budget": args.budget}
    for _ in range(args.rounds):
        for key, env_extra, spec in (("stock_s", {"VLLM_PLUGINS": "moe_offload_amx"}, {}), ("plugin_s", {}, offload)):
            env = {k: v for k, v in os.environ.items() if k != "VLLM_PLUGINS"} | env_extra
            out = subprocess.run(
                [sys.executable, __file__, args.model, "--reps", str(args.reps), "--child", json.dumps(spec)],
                env=env, check=True, capture_output=True, text=True,
            ).stdout
            report[key] += json.loads(out.split("TIMES ", 1)[1].splitlines()[0])
    for key in ("stock_s", "plugin_s"):
        values = sorted(report[key])
        report[key.replace("_s", "_median_s")] = values[len(values) // 2]
    print(json.dumps({"model": args.model, "offload": offload, **report}, indent=1))


if __name__ == "__main__":
    main()
