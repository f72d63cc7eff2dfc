"""One process of ``vllm-moe-offload bench``: start engines one after another and measure them.

``python -m vllm_moe_offload.cli.bench_run JOBS.json OUT.json`` runs every job
of JOBS (a list; see ``cli/bench.py``) in order, each with a fresh engine, and
writes their results to OUT. ``bench`` starts one such process per engine
(stock vLLM needs its own, with ``VLLM_PLUGINS=moe_offload_amx``), never two at once.

Per job: drop the page cache (when asked; needs root), record which pages of
the checkpoint sit in the page cache, start the engine, warm it up, run the
workloads (batch-1 decode, one long prefill, a batch of concurrent requests),
and read the offload counters before and after each workload, then the page
cache again. Timings come from vLLM's per-request metrics
(``RequestOutput.metrics``: engine-core timestamps), throughput from the wall
clock around ``LLM.generate``.
"""

from __future__ import annotations

import ctypes
import gc
import json
import logging
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

logger = logging.getLogger("vllm.moe_offload.bench")

#: checkpoint tensors that belong to routed experts (the bytes offload reads from disk)
EXPERT_TENSOR_RE = re.compile(r"\.experts\.\d+\.")

#: totals of the offload statistics that are not counters (not differenced per workload)
_NOT_SUMMED = ("layers", "slots", "slot_bytes", "resident", "hit_rate", "ready_rate", "precision", "recall")


def drop_page_cache() -> str | None:
    """Write dirty pages back and drop the page cache; None when done, else why not."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def resident_pages(path: str) -> np.ndarray:
    """One bool per 4 KiB page of ``path``: is it in the page cache now (``mincore(2)``)?"""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    page = os.sysconf("SC_PAGE_SIZE")
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED: maps, reads nothing
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap of {path} failed")
        try:
            vec = (ctypes.c_ubyte * ((size + page - 1) // page))()
            if libc.mincore(ctypes.c_void_p(addr), size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore of {path} failed")
        finally:
            libc.munmap(ctypes.c_void_p(addr), size)
    finally:
        os.close(fd)
    return (np.frombuffer(vec, dtype=np.uint8) & 1).astype(bool)


def page_cache_report(model: str) -> dict:
    """Bytes of the checkpoint in the page cache: all of it, and inside expert tensors."""
    from vllm_moe_offload.runtime.safetensors_io import CheckpointIndex

    page = os.sysconf("SC_PAGE_SIZE")
    index = CheckpointIndex(model)
    out = {"file_bytes": 0, "resident_bytes": 0, "expert_bytes": 0, "expert_resident_bytes": 0}
    experts_by_file: dict[str, list[tuple[int, int]]] = {}
    for name in index.names():
        if EXPERT_TENSOR_RE.search(name):
            loc = index[name]
            experts_by_file.setdefault(loc.path, []).append((loc.offset, loc.offset + loc.num_bytes))
    for path in sorted({index[n].path for n in index.names()}):
        resident = resident_pages(path)
        out["file_bytes"] += os.path.getsize(path)
        out["resident_bytes"] += int(resident.sum()) * page
        in_experts = np.zeros_like(resident)
        for start, end in experts_by_file.get(path, []):
            in_experts[start // page : (end + page - 1) // page] = True
            out["expert_bytes"] += end - start
        out["expert_resident_bytes"] += int((resident & in_experts).sum()) * page
    return out


def memory_kib() -> dict:
    """Resident anonymous memory now, the process's peak resident set and, where the kernel says, how much of
    its anonymous memory sits in transparent huge pages now (KiB).

    The huge pages are a diagnostic: the slot pools ask for them (``runtime/memory.py``) and the kernel grants
    them only as far as it finds free 2 MiB blocks, so two runs of the same code may differ in them.
    """
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("RssAnon", "VmHWM", "VmRSS"):
                out[key] = int(line.split()[1])
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    out["AnonHugePages"] = int(line.split()[1])
    except OSError:  # no smaps_rollup (older kernels, other systems): the report leaves the column out
        pass
    return out


def worker_memory_kib(worker) -> dict:
    """Runs in the worker (``collective_rpc``): its process's memory (the model lives there)."""
    return memory_kib()


def offload_totals(llm) -> dict | None:
    """The worker's offload statistics, None for stock vLLM (no such RPC method)."""
    try:
        stats = llm.collective_rpc("moe_offload_stats")[0]
    except Exception:  # noqa: BLE001 - stock workers do not have the method
        return None
    return stats or None


def _delta(after: dict | None, before: dict | None) -> dict | None:
    """Offload counters of one workload: every summed counter's change, then the rates."""
    if after is None or before is None:
        return None
    a, b = after["total"], before["total"]
    out = {key: a[key] - b.get(key, 0) for key in a
           if isinstance(a[key], (int, float)) and not isinstance(a[key], bool) and key not in _NOT_SUMMED}
    out["bytes_read"] = sum(a["bytes_read"].values()) - sum(b["bytes_read"].values())
    hits, prefetched = out.get("hits", 0), out.get("prefetch_hits", 0)
    needed = hits + prefetched + out.get("misses", 0)
    out["demand_hit_rate"] = hits / needed if needed else 1.0
    out["ready_rate"] = (hits + prefetched) / needed if needed else 1.0
    if out.get("predicted"):
        out["precision"] = out.get("predicted_right", 0) / out["predicted"]
    if out.get("needed_when_predicted"):
        out["recall"] = out.get("predicted_right", 0) / out["needed_when_predicted"]
    return out


def _request_times(output) -> dict:
    """TTFT, TPOT and prefill time of one finished request from vLLM's metrics (seconds)."""
    m = output.metrics
    generated = len(output.outputs[0].token_ids)
    if m is None:
        return {"generated": generated}
    decode_s = m.last_token_ts - m.first_token_ts
    return {
        "generated": generated,
        "prompt_tokens": len(output.prompt_token_ids),
        "ttft_s": m.first_token_latency,
        "prefill_s": m.first_token_ts - m.scheduled_ts,
        "decode_s": decode_s,
        "tpot_s": decode_s / (generated - 1) if generated > 1 else None,
    }


def run_workload(llm, name: str, prompts: list[list[int]], max_tokens: int) -> dict:
    """Generate greedily (EOS ignored) and measure; the offload counters' change is added by the caller."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    started = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    wall_s = time.perf_counter() - started
    per_request = [_request_times(o) for o in outputs]
    generated = sum(r["generated"] for r in per_request)
    prompt_tokens = sum(len(p) for p in prompts)
    result = {
        "workload": name,
        "requests": len(prompts),
        "prompt_tokens": prompt_tokens,
        "generated_tokens": generated,
        "wall_s": wall_s,
        "throughput_tok_s": generated / wall_s,
        "total_tok_s": (prompt_tokens + generated) / wall_s,
        "tokens": [list(o.outputs[0].token_ids) for o in outputs],
    }
    timed = [r for r in per_request if "ttft_s" in r]
    if timed:
        result["ttft_s"] = float(np.mean([r["ttft_s"] for r in timed]))
        result["p99_ttft_s"] = float(np.percentile([r["ttft_s"] for r in timed], 99))
        result["prefill_tok_s"] = float(np.mean([r["prompt_tokens"] / r["prefill_s"] for r in timed]))
        tpots = [r["tpot_s"] for r in timed if r["tpot_s"] is not None]
        if tpots:
            result["tpot_s"] = float(np.mean(tpots))
            result["decode_tok_s"] = float(np.mean([1.0 / t for t in tpots]))
    return result


_PROFILER = None


def start_profile(worker) -> None:
    """Runs in the worker (``collective_rpc``): cProfile the thread that executes the model."""
    import cProfile

    global _PROFILER
    _PROFILER = cProfile.Profile()
    _PROFILER.enable()


def stop_profile(worker, top: int = 30) -> dict:
    """Runs in the worker: stop the profiler; the busiest functions and those of the MoE path."""
    import pstats

    global _PROFILER
    profiler, _PROFILER = _PROFILER, None
    if profiler is None:
        return {}
    profiler.disable()
    stats = pstats.Stats(profiler)
    rows = []
    for (filename, line, func), (_, ncalls, tottime, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append({
            "function": f"{Path(filename).name}:{line}({func})" if line else func,
            "ncalls": ncalls, "tottime_s": tottime, "cumtime_s": cumtime,
        })
    rows.sort(key=lambda r: r["tottime_s"], reverse=True)
    wanted = re.compile(r"offloaded_forward|_kernel|ensure|remap|end_step|forward_modular|unique|tolist"
                        r"|routed_experts|moe_forward|fused_experts|select_experts|_forward_impl")
    return {
        "total_s": sum(r["tottime_s"] for r in rows),
        "top_tottime": rows[:top],
        "moe_functions": sorted((r for r in rows if wanted.search(r["function"])),
                                key=lambda r: r["cumtime_s"], reverse=True),
    }


def profile_decode(llm, prompt: list[int], max_tokens: int) -> dict:
    """cProfile one batch-1 decode inside the worker: where the host time of the MoE layers goes."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    llm.collective_rpc(start_profile)
    llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
    return {"generated_tokens": max_tokens, **llm.collective_rpc(stop_profile)[0]}


def drain_routing(worker) -> list:
    """Runs in the worker: the routing recorded since the last call, ``[step][token][layer][k]`` expert ids."""
    from vllm_moe_offload.integration import tracing

    return [step.topk_ids.tolist() for step in tracing.drain(worker)]


def run_job(job: dict) -> dict:
    """One engine: start, warm up, workloads, statistics (see module docstring).

    A job with ``record_routing`` records each workload's routing after the
    warm-up (``integration/tracing.py``; the engine is eager) into its
    ``routing``: the routing every run of the same prompts shares. With
    ``rounds`` > 1 it then runs the workloads again, without the recorder and
    the prefix cache reset before each, and adds their times as ``round_wall_s``.
    """
    from vllm import LLM

    result: dict = {"name": job["name"], "kind": job["kind"], "started_at": time.time()}
    if job.get("drop_cache"):
        result["drop_cache_error"] = drop_page_cache()
    result["page_cache_before"] = page_cache_report(job["model"])
    additional = {"moe_offload": job["offload"]} if job.get("offload") else {}
    started = time.perf_counter()
    llm = LLM(model=job["model"], additional_config=additional, disable_log_stats=False, **job["engine"])
    result["startup_s"] = time.perf_counter() - started
    result["page_cache_after_start"] = page_cache_report(job["model"])
    config = llm.llm_engine.vllm_config
    result["engine"] = {
        **job["engine"],
        "max_num_batched_tokens": config.scheduler_config.max_num_batched_tokens,
        "max_num_seqs": config.scheduler_config.max_num_seqs,
        "kv_cache_memory_bytes": config.cache_config.kv_cache_memory_bytes,  # the plugin's size where none was given
        "enable_prefix_caching": config.cache_config.enable_prefix_caching,
        "multiprocessing": os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") != "0",
    }
    run_workload(llm, "warmup", job["warmup"]["prompts"], job["warmup"]["max_tokens"])
    if job.get("record_routing"):
        from vllm_moe_offload.integration import tracing

        llm.collective_rpc(tracing.install)
    stats = offload_totals(llm)
    result["offload"] = {k: v for k, v in stats.items() if k not in ("layers", "total")} if stats else None
    result["workloads"] = {}
    for name, spec in job["workloads"].items():
        before = stats
        measured = run_workload(llm, name, spec["prompts"], spec["max_tokens"])
        stats = offload_totals(llm)
        measured["offload"] = _delta(stats, before)
        if job.get("record_routing"):
            measured["routing"] = llm.collective_rpc(drain_routing)[0]
        result["workloads"][name] = measured
        logger.info("%s %s: %.1f tok/s", job["name"], name, measured["throughput_tok_s"])
    result["offload_total"] = stats["total"] if stats else None
    if job.get("profile"):
        spec = job["workloads"]["decode"]
        result["profile"] = profile_decode(llm, spec["prompts"][0], spec["max_tokens"])
    if job.get("record_routing"):
        llm.collective_rpc(tracing.uninstall)  # the recorder holds the model
    for _ in range(job.get("rounds", 1) - 1):
        for name, spec in job["workloads"].items():
            llm.reset_prefix_cache()  # the prompts' blocks are cached: a repeat would skip their prefill
            again = run_workload(llm, name, spec["prompts"], spec["max_tokens"])
            result["workloads"][name].setdefault("round_wall_s", []).append(again["wall_s"])
            if again.get("ttft_s") is not None and again.get("tpot_s") is not None:  # the causal floor's phases
                for key in ("ttft_s", "tpot_s"):  # (cli/bench_bound.py)
                    result["workloads"][name].setdefault(f"round_{key}", []).append(again[key])
    result["memory_kib"] = llm.collective_rpc(worker_memory_kib)[0]
    result["page_cache_after"] = page_cache_report(job["model"])
    del llm
    gc.collect()
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    jobs = json.loads(Path(argv[0]).read_text())
    results = [run_job(job) for job in jobs]
    Path(argv[1]).write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    # Run the imported module, not __main__: functions sent to the engine process
    # (start_profile, stop_profile) must be pickled by reference to share globals.
    from vllm_moe_offload.cli.bench_run import main as _main

    sys.exit(_main())
