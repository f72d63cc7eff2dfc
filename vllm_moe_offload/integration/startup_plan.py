"""The startup plan: one INFO block saying what is resident, what is offloaded and where, and how fast it loads.

Logged once per worker when the offload runtime is ready (``setup._log_plan``),
through vLLM's logger namespace so it shows with vLLM's default logging. The
link speed is measured, not assumed: one expert of an offloaded layer is
fetched from its tier (and copied to the slots' device) while the block is
being written. The expected hit rate needs an activation trace of the
workload; none is read at startup yet, so the block says how to estimate it
(``vllm-moe-offload trace`` then ``simulate``).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

from vllm_moe_offload.core.config import Policy, Quant, Store, Tier, format_bytes
from vllm_moe_offload.runtime.ledger import MemoryKind

if TYPE_CHECKING:
    from vllm_moe_offload.core.memory_budget import AutoBudget
    from vllm_moe_offload.integration.setup import OffloadRuntime
    from vllm_moe_offload.runtime.slots import LayerSlots

logger = logging.getLogger("vllm.moe_offload.startup_plan")


def log_startup_plan(runtime: OffloadRuntime, model: str, took_s: float, others: str | None = None) -> None:
    """Log :func:`plan_lines` as one INFO record."""
    logger.info("%s", "\n".join(plan_lines(runtime, model, took_s, others)))


def plan_lines(runtime: OffloadRuntime, model: str, took_s: float, others: str | None = None) -> list[str]:
    """``others``: the engine's processes besides this worker's, in words (:func:`other_processes`)."""
    config, plan = runtime.config, runtime.plan
    layers = runtime.layers
    resident = [s.layer_idx for s in layers if s.fully_resident]
    offloaded = [s for s in layers if not s.fully_resident]
    first = layers[0]
    lines = [
        f"MoE offload ready in {took_s:.2f} s: policy {config.policy.value}, {model}",
        f"  layers     {plan.num_layers} MoE layers x {plan.num_experts} experts of "
        f"{format_bytes(plan.expert_bytes)} each",
        "  resident   " + (f"{_ranges(resident)} (every expert in fast memory)" if resident else "none"),
        "  offloaded  " + (
            ", ".join(f"{_ranges(ids)}: {n}/{plan.num_experts} slots" for n, ids in _by_slots(offloaded))
            or "none (the budget holds every expert)"
        ),
        *_pool_lines(offloaded),
        f"  where      {_where(runtime, first)}",
        f"  budget     {format_bytes(plan.budget_bytes)}; slots use {format_bytes(plan.slot_bytes)}; "
        f"staging {format_bytes(plan.staging_bytes)}; all experts {format_bytes(plan.total_expert_bytes)}",
        *([f"  auto       {runtime.auto_budget.explain()}"] if runtime.auto_budget is not None else
          [f"  kv cache   {runtime.kv_cache}"] if runtime.kv_cache is not None else []),
        f"  link       {_measure_link(runtime, offloaded)}",
        *_store_hint(runtime, offloaded),
        *processes_hint(runtime.auto_budget, others),
    ]
    if config.policy is Policy.FATE:
        lines.append(f"  prediction {runtime.predicted_layers} layers prefetched from the previous layer's router")
    if runtime.layers_ahead:
        count = runtime.layers_ahead
        lines.append(f"  prediction prefills and batches: {count} layer{'s load' if count != 1 else ' loads'} the next one's "
                     "first experts while they compute (its router on their input), as many as the link idles "
                     "between them")
    if runtime.token_prefetch is not None:
        lines.append("  prediction batch-1 decode: each layer's experts loaded ahead from the step's input token "
                     "(where it sent that token last)")
    lines.append(
        "  hit rate   expected: unknown (no trace at startup; `vllm-moe-offload trace` then "
        "`vllm-moe-offload simulate` estimates it for a budget)"
    )
    return lines


def _store_hint(runtime: OffloadRuntime, offloaded: list[LayerSlots]) -> list[str]:
    """Where loads convert every expert read from the checkpoint on the host: what the kernel store would save."""
    config, plan = runtime.config, runtime.plan
    if (not offloaded or runtime.tier is not Tier.DISK or config.store is not Store.CHECKPOINT
            or config.quant is not Quant.NONE or offloaded[0].w13_slots.device.type != "cpu"):
        return []
    return [
        f"  store      each load converts its expert from the checkpoint; --moe-offload-store kernel writes the "
        f"experts once in the kernel layout ({format_bytes(plan.total_expert_bytes)} of disk under the cache "
        f"directory) and reads them straight into the slots: no conversion, and the staging goes to the slots"
    ]


#: other processes' share of a memory limit below which the startup plan does not mention them
_OTHERS_WORTH_SAYING_BYTES = 256 * 2**20


def processes_hint(auto: AutoBudget | None, others: str | None) -> list[str]:
    """Under a memory limit, what vLLM's other processes took from the experts, and how to get it back.

    ``others``: what they are, in words (:func:`other_processes`); None when the engine is one process.
    """
    held = auto.other_processes_bytes if auto is not None else None
    if others is None or held is None or held < _OTHERS_WORTH_SAYING_BYTES:
        return []
    return [
        f"  processes  vLLM's {others} hold{'s' if ' and ' not in others else ''} {format_bytes(held)} of the "
        f"limit; LLM(...) with VLLM_ENABLE_V1_MULTIPROCESSING=0 runs the engine in one process, and auto then "
        f"gives most of it to the experts"
    ]


def other_processes(parallel_config) -> str | None:
    """The engine's processes besides this worker's, in words; None when there are none."""
    import vllm.envs as envs

    if not envs.VLLM_ENABLE_V1_MULTIPROCESSING:
        return None
    # "uni" under multiprocessing: the worker runs in the engine core (patches/cpu_executor.py)
    return "front end" if parallel_config.distributed_executor_backend == "uni" else "front end and engine core"


def _where(runtime: OffloadRuntime, first: LayerSlots) -> str:
    device = first.w13_slots.device
    source = first.source  # the checkpoint's folder, or the store's
    folder = getattr(getattr(source, "index", None), "folder", None) or getattr(
        getattr(source, "store", None), "directory", None)
    if runtime.tier is Tier.DISK:
        io = "direct I/O" if runtime.config.direct_io else "buffered I/O (page cache)"
        return f"slots on {device}; offloaded experts read from {folder} ({io})"
    pinned = " (pinned)" if device.type == "cuda" else ""
    return f"slots on {device}; offloaded experts held in host memory{pinned}, copied from the checkpoint at startup"


def _measure_link(runtime: OffloadRuntime, offloaded: list[LayerSlots]) -> str:
    """Time one expert load from the slow tier to the slots' device: bytes/s of the real path.

    The expert is read twice and the second read timed, into the memory the first one filled, as a load lands
    in a slot: an expert's first read in a process also checks its crc32 and faults in fresh pages (on the
    9 GiB model of the README's "Bigger than memory", 96 MiB experts that the runs read in about 45 ms, the
    first read took 252-494 ms, so the figure said 0.25-0.40 GB/s of a 2.1 GB/s disk; the second 74-76 ms,
    1.32-1.36 GB/s, while the slots' pages are mapped in the background: ``runtime/memory.Populator``).
    """
    if not offloaded:
        return "not measured (nothing is offloaded)"
    slots = offloaded[-1]
    expert_idx = slots.slot_map.num_experts - 1
    device = slots.w13_slots.device
    started = time.perf_counter()
    got = slots.source.fetch(expert_idx)
    first_s = time.perf_counter() - started
    started = time.perf_counter()
    got = slots.source.fetch(expert_idx, into=got.tensors)
    runtime.link.pace(got.bytes_read, started)
    # a copy on another device is fast memory too: the ledger has room for it after start-up (no load runs)
    probe_bytes = got.w13.nbytes + got.w2.nbytes if device != got.w13.device else 0
    if runtime.ledger is not None:
        runtime.ledger.reserve(MemoryKind.PROBE, probe_bytes, "the expert copied to measure the link")
    w13 = got.w13.to(device, non_blocking=True)  # [2I', H'] kernel layout, like a slot row
    w2 = got.w2.to(device, non_blocking=True)  # [H', I']
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    took_s = time.perf_counter() - started
    del w13, w2
    if runtime.ledger is not None:
        runtime.ledger.release(MemoryKind.PROBE, probe_bytes)
    speed = got.bytes_read / took_s if took_s > 0 else float("inf")
    return (
        f"measured {format_bytes(got.bytes_read)} (one expert, {runtime.tier.value} -> {device}) in "
        f"{took_s * 1e3:.2f} ms = {speed / 1e9:.3f} GB/s (its first read, with the first read's checks, "
        f"{first_s * 1e3:.2f} ms); {runtime.link.describe()}"
    )


def _by_slots(layers: list[LayerSlots]) -> list[tuple[int, list[int]]]:
    """Layers grouped by slot count (a shared pool's layers: their share), in layer order of the first of each."""
    groups: dict[int, list[int]] = {}
    for slots in layers:
        groups.setdefault(slots.stats.num_slots, []).append(slots.layer_idx)
    return list(groups.items())


def _pool_lines(offloaded: list[LayerSlots]) -> list[str]:
    """The cache's replacement, and how a shared pool works, for the offloaded layers."""
    if not offloaded:
        return []
    name = offloaded[0].slot_map.policy.name
    pooled = [s for s in offloaded if s.pooled]
    if not pooled:
        return [f"  cache      {name} replacement"]
    pool = pooled[0].slot_map.pool
    predicts = hasattr(pooled[0].slot_map.policy, "predicted_uses")
    rate = f"decayed use rate{f' plus {name} predicted uses' if predicts else ''}, and layer distance"
    return [
        f"  cache      {name} replacement",
        f"  pool       one pool of {pool.num_slots} slots shared by {_ranges([s.layer_idx for s in pooled])}: the "
        f"layer that runs takes up to {pool.pass_capacity} from the others; the pool evicts the expert whose "
        f"next use is expected farthest ({rate}), {name} says what a prefetch spares",
    ]


def _ranges(ids: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``layers 0-2, 5``."""
    if not ids:
        return ""
    parts, start = [], ids[0]
    for prev, cur in zip(ids, [*ids[1:], None]):
        if cur != prev + 1:
            parts.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = cur
    return ("layer " if len(ids) == 1 else "layers ") + ", ".join(parts)
