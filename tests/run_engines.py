"""Run several vLLM engines one after another in this process and print their results as JSON.

Used by the integration tests (engine start-up dominates their time, so one
process runs a whole list of jobs). Usage: ``python run_engines.py JOBS.json OUT.json``
where JOBS is a list of {"name", "model", "engine": {...LLM kwargs}, "prompts": [...],
"max_tokens": N}. Set VLLM_PLUGINS=moe_offload_amx in the environment for stock vLLM (tests/conftest.py).

vLLM inspects each model architecture in a fresh Python process (about 6-20 s
here) unless ``$VLLM_CACHE_ROOT/modelinfos`` holds the result. Each runner gets
its own VLLM_CACHE_ROOT, so when ``MOE_OFFLOAD_TEST_MODELINFO_DIR`` names a
folder (tests/conftest.py sets one per test session) the runner copies vLLM's
cached model infos from it before the first job and back after the last:
vLLM's own cache, kept between runners as it is between a user's runs.
"""

import gc
import json
import os
import shutil
import sys
import time
from pathlib import Path

#: names the folder of vLLM's model-info cache files shared by the runners of one test session
SHARED_MODELINFO_ENV = "MOE_OFFLOAD_TEST_MODELINFO_DIR"


def rss_anon_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    return -1


def torch_threads(worker) -> int:
    """Runs where the model computes (``collective_rpc``): the OpenMP threads its kernels use."""
    import torch

    return torch.get_num_threads()


def run_job(job: dict) -> dict:
    from vllm import LLM, SamplingParams

    started, started_cpu = time.perf_counter(), time.process_time()
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
    # CPU seconds of all this process's threads: less disturbed than wall time on a shared machine
    result["startup_cpu_s"] = time.process_time() - started_cpu
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
        t0, t0_cpu = time.perf_counter(), time.process_time()
        outs = llm.generate(prompts, round_params, use_tqdm=False)
        rounds.append({
            "generate_s": time.perf_counter() - t0,
            "generate_cpu_s": time.process_time() - t0_cpu,
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
    if job.get("report_threads"):  # a function sent to the engine: needs VLLM_ALLOW_INSECURE_SERIALIZATION=1
        result["torch_threads"] = llm.collective_rpc(torch_threads)
    result["rss_anon_kib"] = rss_anon_kib()
    t0 = time.perf_counter()
    del llm
    gc.collect()
    gc.freeze()  # what outlived the engine stays: see main()
    result["shutdown_s"] = time.perf_counter() - t0
    return result


def apply_fault(fault: dict) -> None:
    """A fault injected between rounds: {"truncate": PATH, "at_bytes": N}."""
    if "truncate" in fault:
        os.truncate(fault["truncate"], fault["at_bytes"])
    else:
        raise ValueError(f"unknown fault {fault}")


def copy_modelinfos(source: Path, target: Path) -> None:
    """Copy vLLM's model-info cache files that ``target`` lacks or holds older (vLLM checks their hash)."""
    if not source.is_dir():
        return
    target.mkdir(parents=True, exist_ok=True)
    for path in source.glob("*.json"):
        dest = target / path.name
        if dest.exists() and dest.stat().st_mtime_ns >= path.stat().st_mtime_ns:
            continue
        partial = target / f".{path.name}.{os.getpid()}.partial"
        shutil.copy2(path, partial)
        os.replace(partial, dest)  # whole or absent, never half-written


def main() -> None:
    jobs = json.load(open(sys.argv[1]))
    # An engine's start-up runs three full garbage collections, each about 0.4 s here over the
    # ~600,000 objects of torch's, transformers' and vLLM's modules. Frozen (as vLLM's own
    # freeze_gc_heap does once started) they are skipped. vLLM's shutdown unfreezes everything
    # to collect the engine; run_job freezes again what outlived it.
    from vllm import LLM  # noqa: F401 - imported to be frozen

    gc.collect()
    gc.freeze()
    # (tests/conftest.py's engine_env always sets VLLM_CACHE_ROOT; without it, nothing is shared)
    shared, cache_root = os.environ.get(SHARED_MODELINFO_ENV), os.environ.get("VLLM_CACHE_ROOT")
    own = Path(cache_root or ".") / "modelinfos"
    if shared and cache_root:
        copy_modelinfos(Path(shared), own)
    try:
        results = [run_job(job) for job in jobs]
    finally:
        if shared and cache_root:
            copy_modelinfos(own, Path(shared))
    with open(sys.argv[2], "w") as f:
        json.dump(results, f)
    gc.unfreeze()  # else the interpreter's exit leaves the frozen objects be (nanobind reports them leaked)


if __name__ == "__main__":
    main()
