"""Run several vLLM engines one after another in this process and print their results as JSON.

Used by the integration tests (engine start-up dominates their time, so one
process runs a whole list of jobs). Usage: ``python run_engines.py JOBS.json OUT.json``
where JOBS is a list of {"name", "model", "engine": {...LLM kwargs}, "prompts": [...],
"max_tokens": N}. Set VLLM_PLUGINS=none in the environment for stock vLLM.
"""

import gc
import json
import os
import resource
import sys
import time


def rss_anon_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    return -1


def run_job(job: dict) -> dict:
    from vllm import LLM, SamplingParams

    started = time.perf_counter()
    kwargs = {
        "dtype": "bfloat16", "max_model_len": 512, "kv_cache_memory_bytes": 64 * 2**20, "enforce_eager": True,
        "seed": 0, **job.get("engine", {}),
    }
    result: dict = {"name": job["name"]}
    try:
        llm = LLM(model=job["model"], **kwargs)
    except Exception as exc:  # noqa: BLE001 - the test reads the message
        result["error"] = f"{type(exc).__name__}: {exc}"
        return result
    result["startup_s"] = time.perf_counter() - started
    params = SamplingParams(temperature=0.0, max_tokens=job.get("max_tokens", 16), ignore_eos=True)
    rounds = []
    # "rounds": [{"prompts", "faults", "pause_s", "max_tokens"}...] run one after another on the same engine
    for spec in job.get("rounds", [{"prompts": job.get("prompts")}]):
        for fault in spec.get("faults", []):
            apply_fault(fault)
        prompts = [{"prompt_token_ids": p} for p in spec.get("prompts") or job["prompts"]]
        round_params = params
        if "max_tokens" in spec:
            round_params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True)
        t0 = time.perf_counter()
        outs = llm.generate(prompts, round_params, use_tqdm=False)
        rounds.append({
            "generate_s": time.perf_counter() - t0,
            "tokens": [list(o.outputs[0].token_ids) for o in outs],
            "finish_reasons": [o.outputs[0].finish_reason for o in outs],
        })
        time.sleep(spec.get("pause_s", 0))
    result.update(rounds[0])
    result["rounds"] = rounds
    try:
        result["stats"] = llm.collective_rpc("moe_offload_stats")
    except Exception as exc:  # noqa: BLE001 - stock workers have no such method
        result["stats"] = None
        result["stats_error"] = f"{type(exc).__name__}: {exc}"
    result["rss_anon_kib"] = rss_anon_kib()
    del llm
    gc.collect()
    return result


def apply_fault(fault: dict) -> None:
    """A fault injected between rounds: {"truncate": PATH, "at_bytes": N}."""
    if "truncate" in fault:
        os.truncate(fault["truncate"], fault["at_bytes"])
    else:
        raise ValueError(f"unknown fault {fault}")


def main() -> None:
    jobs = json.load(open(sys.argv[1]))
    results = [run_job(job) for job in jobs]
    with open(sys.argv[2], "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
