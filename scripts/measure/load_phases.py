"""Where one expert load's time goes: read syscall, crc32 check, conversion, copy into the slot.

Starts one in-process engine on MODEL with the given offload settings, then on the
worker times ``LayerSlots._load`` of every expert of every offloaded layer, one load
at a time on the calling thread, ``--passes`` times. Each phase is timed by wrapping
the function that does it (the same names on every checkout this script is run on):

    read      os.preadv / os.pread (the read syscalls; direct I/O unless direct_io=false)
    crc32     the kernel store's check of an expert's first read in the process
    loader    the converter's ``_load`` (vLLM's loader: this rank's shard into one-expert buffers)
    prepack   ``kernel_format._prepack`` / ``_prepack_projections`` (CPU prepack of w13 and w2 into the slot)
    vllm_conv ``_ExpertConverter._vllm_conversion`` (vLLM's own conversion into fresh tensors)
    fill      ``tiers.fill`` / ``kernel_source.fill`` (copying what was read or converted into the slot)
    decode    ``packed_codec.BlockDecoder.feed`` (a packed store's decode into the slot)
    other     the rest of the load (views, Python, a zero-copy read's tail copy)

Per phase: milliseconds and the loader thread's CPU milliseconds per load, and GB/s of
the expert's bytes (kernel layout; for ``read``, of the bytes read). The first pass
also checks crc32s (kernel store); later passes are the steady state. Run it on two
checkouts back to back to compare (``PYTHONPATH=<checkout>``); the machine's load
changes every figure.

    python scripts/measure/load_phases.py .scratch/tm-x16 store=checkpoint
    python scripts/measure/load_phases.py .scratch/tm-x16 store=kernel cache_dir=.scratch/stores
    python scripts/measure/load_phases.py .scratch/tm-x16 store=packed cache_dir=.scratch/stores
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from collections import defaultdict
from contextlib import ExitStack

_PHASES = ("read", "crc32", "loader", "prepack", "vllm_conv", "fill", "decode")


class _Timer:
    """Wall and thread-CPU seconds (and bytes) per phase, from the calling thread only; nested phases
    are not counted twice (the outermost counts)."""

    def __init__(self) -> None:
        self.wall = defaultdict(float)
        self.cpu = defaultdict(float)
        self.nbytes = defaultdict(int)
        self.calls = defaultdict(int)
        self._local = threading.local()
        self.thread = threading.get_ident()

    def wrap(self, phase: str, fn, count_bytes=None):
        def timed(*args, **kwargs):
            if threading.get_ident() != self.thread or getattr(self._local, "inside", False):
                return fn(*args, **kwargs)
            self._local.inside = True
            started, cpu = time.perf_counter(), time.thread_time()
            try:
                out = fn(*args, **kwargs)
            finally:
                self._local.inside = False
            self.wall[phase] += time.perf_counter() - started
            self.cpu[phase] += time.thread_time() - cpu
            self.calls[phase] += 1
            if count_bytes is not None:
                self.nbytes[phase] += count_bytes(out)
            return out

        return timed


def _patch(stack: ExitStack, obj, name: str, timer: _Timer, phase: str, count_bytes=None) -> None:
    if not hasattr(obj, name):
        return
    original = getattr(obj, name)
    setattr(obj, name, timer.wrap(phase, original, count_bytes))
    stack.callback(setattr, obj, name, original)


def _probe(worker, passes: int) -> dict:
    runtime = worker._moe_offload
    # on an I/O thread of the engine, as loads run (one OpenMP thread: see runtime/transfer.py)
    results = [runtime.engine.submit(_one_pass, runtime, n).result() for n in range(passes)]
    stats = runtime.stats()
    # conversion scratch the I/O lanes hold after the loads (real memory, reused load after load)
    scratch = sum(lane.scratch_bytes for lane in getattr(runtime.readers, "_all_lanes", []))
    return {"expert_bytes": runtime.plan.expert_bytes, "conversion": stats["conversion"],
            "ledger_peak_by_kind": stats.get("peak_by_kind"), "lane_scratch_bytes": scratch, "passes": results}


def _one_pass(runtime, n: int) -> dict:
    from vllm_moe_offload.integration import kernel_format
    from vllm_moe_offload.runtime import checked_read, expert_store, kernel_source, packed_codec, tiers

    layers = [s for s in runtime.layers if not s.fully_resident]
    timer = _Timer()
    loads = 0
    with ExitStack() as stack:
        _patch(stack, os, "preadv", timer, "read", lambda got: got)
        _patch(stack, os, "pread", timer, "read", len)
        _patch(stack, expert_store, "crc32", timer, "crc32")  # a read through a staging copy
        _patch(stack, checked_read, "crc32", timer, "crc32")  # a read into the slot
        _patch(stack, kernel_format, "_prepack", timer, "prepack")
        _patch(stack, kernel_format, "_prepack_projections", timer, "prepack")  # from the read buffer
        _patch(stack, kernel_format._ExpertConverter, "_vllm_conversion", timer, "vllm_conv")
        _patch(stack, kernel_format._ExpertConverter, "_load", timer, "loader")
        _patch(stack, tiers, "fill", timer, "fill")
        _patch(stack, kernel_source, "fill", timer, "fill")
        _patch(stack, packed_codec.BlockDecoder, "feed", timer, "decode")
        started, cpu = time.perf_counter(), time.thread_time()
        for slots in layers:
            for expert in range(slots.slot_map.num_experts):
                slots._load(expert, expert % slots.num_slots)
                loads += 1
        wall_s, cpu_s = time.perf_counter() - started, time.thread_time() - cpu
    expert_bytes = runtime.plan.expert_bytes
    phases = {}
    for phase in _PHASES:
        if not timer.calls[phase]:
            continue
        ms = timer.wall[phase] / loads * 1e3
        moved = timer.nbytes[phase] / loads if phase == "read" else expert_bytes
        phases[phase] = {"ms": round(ms, 3), "cpu_ms": round(timer.cpu[phase] / loads * 1e3, 3),
                         "GB/s": round(moved / ms / 1e6, 2), "calls_per_load": round(timer.calls[phase] / loads, 2)}
    other_ms = (wall_s - sum(timer.wall.values())) / loads * 1e3
    phases["other"] = {"ms": round(other_ms, 3),
                       "cpu_ms": round((cpu_s - sum(timer.cpu.values())) / loads * 1e3, 3)}
    return {
        "pass": n, "loads": loads,
        "load_ms": round(wall_s / loads * 1e3, 3), "load_cpu_ms": round(cpu_s / loads * 1e3, 3),
        "load_GB/s": round(expert_bytes * loads / wall_s / 1e9, 2),
        "read_bytes_per_load": timer.nbytes["read"] // loads, "phases": phases,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("settings", nargs="*", help="moe_offload KEY=VALUE (default policy=lru budget=25%%)")
    parser.add_argument("--passes", type=int, default=3, help="passes over every expert of every offloaded layer")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the probe runs in this process
    from vllm import LLM

    config = {"policy": "lru", "budget": "25%"}
    for item in args.settings:
        key, _, value = item.partition("=")
        config[key] = int(value) if value.isdigit() else value
    llm = LLM(args.model, max_model_len=512, enforce_eager=True, kv_cache_memory_bytes=1 << 28,
              additional_config={"moe_offload": config})
    (got,) = llm.collective_rpc(_probe, args=(args.passes,))
    report = {"settings": config, **got}
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
