"""Time to warm with and without a saved activation profile, on the trained tiny-mixtral.

Usage (from the repository root, in .venv):
    python scripts/measure/warm_start.py OUT_DIR [--budget 25%] [--tokens 64]

1. An engine with ``save_profile`` serves "yesterday's" prompts (held-out
   tokens, first half) and writes the profile at shutdown.
2. A fresh engine without the profile and one with it (``lru``, same budget)
   each serve "today's" prompts (second half) one request at a time; after
   every request the hit rate so far is read from the workers.

Prints and writes ``warm_start.json``: per request, the cumulative hit rate of
both, and how many requests each needs to come within 0.02 of its final rate.
Engines run one after another in one child process each (never two at once).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

#: the trained tiny model beside the repository (../shared), never copied into it
MODEL = Path(__file__).resolve().parents[3] / "shared" / "models" / "tiny-mixtral"
HELDOUT = MODEL.parent / "tiny-mixtral-heldout-tokens.npy"
NUM_REQUESTS = 12
PROMPT_TOKENS = 32


def _child(job: dict) -> dict:
    import numpy as np
    from vllm import LLM, SamplingParams

    tokens = np.load(HELDOUT).astype(int)
    start = job["offset"]
    prompts = [
        [int(t) for t in tokens[start + i * PROMPT_TOKENS: start + (i + 1) * PROMPT_TOKENS]]
        for i in range(NUM_REQUESTS)
    ]
    llm = LLM(
        str(MODEL), dtype="bfloat16", max_model_len=512, kv_cache_memory_bytes=64 * 2**20, enforce_eager=True,
        seed=0, enable_prefix_caching=False, additional_config={"moe_offload": job["offload"]},
    )
    params = SamplingParams(temperature=0.0, max_tokens=job["tokens"], ignore_eos=True)
    curve = []
    for prompt in prompts:
        llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
        total = llm.collective_rpc("moe_offload_stats")[0]["total"]
        curve.append({"hit_rate": total["hit_rate"], "misses": total["misses"], "hits": total["hits"]})
    del llm
    return {"curve": curve}


def _run(job: dict, out: Path) -> dict:
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    job_file, result_file = out / f"{job['name']}.job.json", out / f"{job['name']}.json"
    job_file.write_text(json.dumps(job))
    subprocess.run([sys.executable, __file__, "--child", str(job_file), str(result_file)], env=env, check=True)
    return json.loads(result_file.read_text())


def _requests_to_warm(curve: list[dict], tolerance: float = 0.02) -> int:
    final = curve[-1]["hit_rate"]
    return next(i + 1 for i, point in enumerate(curve) if abs(point["hit_rate"] - final) <= tolerance)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, nargs="?", help="output folder")
    parser.add_argument("--budget", default="25%")
    parser.add_argument("--tokens", type=int, default=64, help="tokens generated per request")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        job = json.loads(Path(args.child[0]).read_text())
        Path(args.child[1]).write_text(json.dumps(_child(job)))
        return
    if args.out is None:
        parser.error("the output folder is required")
    args.out.mkdir(parents=True, exist_ok=True)
    profile = args.out / "profile.npz"
    base = {"tokens": args.tokens}
    _run({**base, "name": "yesterday", "offset": 0,
          "offload": {"policy": "lru", "budget": args.budget, "save_profile": str(profile)}}, args.out)
    today = NUM_REQUESTS * PROMPT_TOKENS
    cold = _run({**base, "name": "cold", "offset": today, "offload": {"policy": "lru", "budget": args.budget}},
                args.out)
    warm = _run({**base, "name": "warm", "offset": today,
                 "offload": {"policy": "lru", "budget": args.budget, "profile": str(profile)}}, args.out)
    report = {
        "model": str(MODEL), "budget": args.budget, "requests": NUM_REQUESTS, "prompt_tokens": PROMPT_TOKENS,
        "generated_tokens": args.tokens,
        "cold": {"curve": [p["hit_rate"] for p in cold["curve"]], "requests_to_warm": _requests_to_warm(cold["curve"]),
                 "first_request_misses": cold["curve"][0]["misses"]},
        "warm": {"curve": [p["hit_rate"] for p in warm["curve"]], "requests_to_warm": _requests_to_warm(warm["curve"]),
                 "first_request_misses": warm["curve"][0]["misses"]},
    }
    (args.out / "warm_start.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
