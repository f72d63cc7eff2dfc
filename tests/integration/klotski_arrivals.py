"""Requests that arrive while others decode, stepped by hand; prints the tokens and stats as JSON.

Used by tests/integration/test_klotski.py (klotski's held decode steps). Usage:
``python klotski_arrivals.py JOB.json OUT.json``, JOB = {"model", "engine": {...LLM kwargs},
"first": [ids], "later": [[ids]...], "after_tokens": N, "max_tokens": M}. The first request
runs alone; once it has ``after_tokens`` tokens, each later request is added at the next step
that produced no output (a held step), or at once with stock vLLM (which never holds), one per
such step. Set VLLM_PLUGINS=moe_offload_amx for stock vLLM.
"""

import json
import sys
import time

#: steps without output tolerated before a later request is added anyway (a hold that never comes)
_MAX_IDLE_STEPS = 1000


def run(job: dict) -> dict:
    from vllm import LLM, SamplingParams

    kwargs = {
        "dtype": "bfloat16", "max_model_len": 512, "kv_cache_memory_bytes": 64 * 2**20, "enforce_eager": True,
        "seed": 0, **job.get("engine", {}),
    }
    llm = LLM(model=job["model"], **kwargs)
    engine = llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], ignore_eos=True)
    stock = job.get("stock", False)
    engine.add_request("r0", {"prompt_token_ids": job["first"]}, params)
    later = list(job["later"])
    tokens: dict[str, list[int]] = {}
    added_at: dict[str, float] = {}
    first_token_s: dict[str, float] = {}
    empty_steps = 0
    while engine.has_unfinished_requests() or later:
        outs = engine.step()
        now = time.perf_counter()
        for out in outs:
            tokens[out.request_id] = list(out.outputs[0].token_ids)
            if out.outputs[0].token_ids and out.request_id not in first_token_s:
                first_token_s[out.request_id] = now
        empty_steps = 0 if outs else empty_steps + 1
        ready = len(tokens.get("r0", [])) >= job["after_tokens"]
        if later and ready and (stock or not outs or empty_steps > _MAX_IDLE_STEPS):
            name = f"r{len(job['later']) - len(later) + 1}"
            engine.add_request(name, {"prompt_token_ids": later.pop(0)}, params)
            added_at[name] = time.perf_counter()
    result = {
        "tokens": [tokens[f"r{i}"] for i in range(len(job["later"]) + 1)],
        "ttft_s": {name: first_token_s[name] - t for name, t in added_at.items()},
    }
    try:
        result["stats"] = llm.collective_rpc("moe_offload_stats")
    except Exception as exc:  # noqa: BLE001 - stock workers have no such method
        result["stats"] = None
        result["stats_error"] = f"{type(exc).__name__}: {exc}"
    return result


def main() -> None:
    job = json.load(open(sys.argv[1]))
    with open(sys.argv[2], "w") as f:
        json.dump(run(job), f)


if __name__ == "__main__":
    main()
