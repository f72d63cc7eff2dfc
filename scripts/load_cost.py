"""Milliseconds per expert load on a loader thread, the way the slot pools load (read, convert, write the slot),
and the loader thread's CPU milliseconds per load.

Starts one in-process engine on MODEL with the given offload settings and times
``LayerSlots._load`` of one offloaded layer: one load at a time on the I/O
thread, then a queue of loads as a miss burst submits them. Compare two checkouts
on the same machine back to back (``PYTHONPATH=<checkout>``); the time of a load
depends on what else the machine runs.

    python scripts/load_cost.py .scratch/tm-x16 policy=lru budget=25%
"""

import argparse
import json
import os
import time


def _probe(worker, layer: int, count: int) -> dict:
    runtime = worker._moe_offload
    slots = runtime.layers[layer]
    experts, num_slots = slots.slot_map.num_experts, slots.num_slots

    def one_at_a_time() -> tuple[float, float]:
        for e in range(num_slots):  # warm-up: the lane's buffers and scratch
            slots._load(e, e)
        started, cpu = time.perf_counter(), time.thread_time()
        for i in range(count):
            slots._load(i % experts, i % num_slots)
        return (time.perf_counter() - started) / count, (time.thread_time() - cpu) / count

    serial_s, cpu_s = runtime.engine.submit(one_at_a_time).result()
    started = time.perf_counter()
    jobs = [runtime.engine.submit(slots._load, i % experts, i % num_slots) for i in range(count)]
    for job in jobs:
        job.result()
    queued_s = (time.perf_counter() - started) / count
    # cpu: the loader thread's own CPU time (copies, conversion, checks; a direct read mostly waits)
    return {"load_ms": round(serial_s * 1e3, 2), "cpu_ms": round(cpu_s * 1e3, 2), "queued_load_ms": round(queued_s * 1e3, 2),
            "expert_bytes": runtime.plan.expert_bytes, "conversion": runtime.stats()["conversion"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("settings", nargs="*", help="moe_offload KEY=VALUE (default policy=lru budget=25%%)")
    parser.add_argument("--layer", type=int, default=1, help="ordinal of the offloaded layer to time")
    parser.add_argument("--count", type=int, default=48, help="loads per measurement")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the probe runs in this process
    from vllm import LLM

    config = {"policy": "lru", "budget": "25%"}
    for item in args.settings:
        key, _, value = item.partition("=")
        config[key] = int(value) if value.isdigit() else value
    llm = LLM(args.model, max_model_len=512, enforce_eager=True, kv_cache_memory_bytes=1 << 28,
              additional_config={"moe_offload": config})
    (got,) = llm.collective_rpc(_probe, args=(args.layer, args.count))
    print(json.dumps({"settings": config, **got}))


if __name__ == "__main__":
    main()
