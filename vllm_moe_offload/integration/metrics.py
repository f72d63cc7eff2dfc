"""Offload counters and gauges on the server's ``/metrics``, named the vLLM way (``vllm:moe_offload_*``).

The counters live in the workers (``OffloadWorkerMixin.moe_offload_stats``),
which ``vllm serve`` runs in the engine-core process; ``/metrics`` is served by
the API-server process from prometheus_client's default registry (vLLM's
``get_prometheus_registry()`` outside multi-API-server mode). vLLM 0.32 has no
channel for worker statistics of a plugin: ``SchedulerStats`` is a fixed
msgspec-encoded dataclass, and a stat-logger plugin (``vllm.stat_logger_plugins``)
would run in the right process but sees only ``SchedulerStats`` and, merely by
being installed, turns on stats collection for every server started with
``--disable-log-stats``. So, when offload is on, ``patches/async_llm.py`` hands
each new ``AsyncLLM`` to :func:`watch`, and:

* a poller task on the server's event loop fetches the workers' stats through
  vLLM's own RPC (``AsyncLLM.collective_rpc("moe_offload_stats")``) once a second
  (between two engine steps; about a millisecond when idle);
* one :class:`OffloadCollector` in the default registry turns the latest answer
  into Prometheus families at scrape time (``collect`` runs on the event loop
  and must not block, hence the cached answer).

Values are therefore at most :data:`POLL_INTERVAL_S` old. With
``--api-server-count`` > 1 vLLM serves a multiprocess registry that a custom
collector cannot join; the offload metrics are then absent and a warning says so.
"""

from __future__ import annotations

import asyncio
import logging
import os
import weakref
from collections.abc import Iterable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import REGISTRY, Collector

logger = logging.getLogger("vllm.moe_offload.metrics")

#: how often the poller asks the workers while requests run: the freshness of
#: /metrics; one RPC a second is negligible next to a decode step
POLL_INTERVAL_S = 1.0

PREFIX = "vllm:moe_offload_"

#: per-layer counters: (stats key, metric name without prefix and _total, help)
_LAYER_COUNTERS = (
    ("hits", "hits", "Expert needs served by a slot that was resident before this step's prefetch."),
    ("misses", "misses", "Expert needs that had to be loaded on demand."),
    ("prefetch_hits", "prefetch_hits", "Expert needs served by a slot that a prefetch made resident."),
    ("loads", "loads", "Experts loaded into slots (demand and prefetch)."),
    ("prefetch_loads", "prefetch_loads", "Experts loaded by prefetch."),
    ("prefetch_unused", "prefetch_unused", "Prefetched experts evicted before any pass used them."),
    ("stall_s", "stall_seconds", "Seconds the forward pass waited for expert loads."),
    ("read_s", "read_seconds", "Seconds the I/O threads spent in expert loads, summed over threads "
                               "(bytes_read over it: the rate the reads achieved)."),
    ("op_s", "op_seconds", "Seconds in the offloaded MoE op: its planning, waits for loads and kernel calls."),
    ("kernel_s", "kernel_seconds", "Seconds of the MoE op in fused-experts kernel calls (op minus kernel minus "
                                   "stall: the plugin's own work)."),
    ("passes", "passes", "Kernel-call groups through the layer (a pass of tokens, or one wave of it)."),
    ("waves", "waves", "Kernel calls that computed tokens whose experts had landed while other loads ran, "
              "or a leaving expert's tokens early so the next pass's load could start in its slot."),
    ("failed_loads", "failed_loads", "Expert needs that could not be met (a read failed or timed out)."),
    ("failed_tokens", "failed_tokens", "Token rows computed without a needed expert (their requests failed)."),
)


def families(per_worker: list[dict], model_name: str) -> list[Metric]:
    """Prometheus families for the answers of ``collective_rpc("moe_offload_stats")`` (one dict per worker).

    Workers with offload inactive answer ``{}`` and add nothing. Labels follow
    vLLM's (``model_name``) plus ``rank`` (the worker) and ``layer`` (the MoE
    layer's ``layer_idx``) where the value is per layer.
    """
    base = ["model_name", "rank"]
    counters = {
        key: CounterMetricFamily(PREFIX + name, doc, labels=[*base, "layer"]) for key, name, doc in _LAYER_COUNTERS
    }
    bytes_read = CounterMetricFamily(
        PREFIX + "bytes_read", "Bytes read from the slow tiers into slots.", labels=[*base, "layer", "tier"],
    )
    resident = GaugeMetricFamily(PREFIX + "resident_experts", "Slots holding an expert now.", labels=[*base, "layer"])
    slots = GaugeMetricFamily(
        PREFIX + "slots", "Slots the planner gave the layer (= num_experts when fully resident).",
        labels=[*base, "layer"],
    )
    budget = GaugeMetricFamily(PREFIX + "budget_bytes", "Memory budget for expert slots and staging.", labels=base)
    slot_bytes = GaugeMetricFamily(PREFIX + "slot_bytes", "Memory the expert slots use.", labels=base)
    staging = GaugeMetricFamily(
        PREFIX + "staging_bytes", "Memory reserved for loads in flight (read buffers, conversion, CUDA staging).",
        labels=base,
    )
    held = GaugeMetricFamily(PREFIX + "held_bytes", "Expert memory held now (slots and staging).", labels=base)
    peak_held = GaugeMetricFamily(
        PREFIX + "peak_held_bytes", "Most expert memory held at once (never above budget_bytes).", labels=base,
    )
    expert_bytes = GaugeMetricFamily(PREFIX + "expert_bytes", "Size of one expert in kernel layout.", labels=base)
    info = GaugeMetricFamily(
        PREFIX + "info", "The planner's decisions (value 1).",
        labels=[*base, "policy", "tier", "num_experts", "resident_layers", "predicted_layers"],
    )
    for rank, stats in enumerate(per_worker):
        if not stats:
            continue
        worker = [model_name, str(rank)]
        budget.add_metric(worker, stats["budget_bytes"])
        slot_bytes.add_metric(worker, stats["slot_bytes"])
        staging.add_metric(worker, stats["staging_bytes"])
        held.add_metric(worker, stats["held_bytes"])
        peak_held.add_metric(worker, stats["peak_held_bytes"])
        expert_bytes.add_metric(worker, stats["expert_bytes"])
        fully_resident = sum(1 for n in stats["layer_slots"] if n >= stats["num_experts"])
        info.add_metric(
            [*worker, stats["policy"], stats["tier"], str(stats["num_experts"]), str(fully_resident),
             str(stats["predicted_layers"])],
            1,
        )
        for layer in stats["layers"]:
            labels = [*worker, str(layer["layer_idx"])]
            for key, family in counters.items():
                family.add_metric(labels, layer[key])
            for tier, num_bytes in sorted(layer["bytes_read"].items()):
                bytes_read.add_metric([*labels, tier], num_bytes)
            resident.add_metric(labels, layer["resident"])
            slots.add_metric(labels, layer["num_slots"])
    return [
        *counters.values(), bytes_read, resident, slots, budget, slot_bytes, staging, held, peak_held, expert_bytes, info,
    ]


class _Source:
    """One watched engine: its model name and the workers' latest answer."""

    def __init__(self, engine, model_name: str) -> None:
        self.engine = weakref.ref(engine)
        self.model_name = model_name
        self.latest: list[dict] = []
        self.task: asyncio.Task | None = None


class OffloadCollector(Collector):
    """Serves the latest stats of every watched engine (``collect`` never blocks)."""

    def __init__(self) -> None:
        self.sources: list[_Source] = []

    def collect(self) -> Iterator[Metric]:
        self.sources = [s for s in self.sources if s.engine() is not None]
        for source in self.sources:
            _ensure_poller(source)
        merged: dict[str, Metric] = {}
        for source in self.sources:
            for family in families(source.latest, source.model_name):
                if family.name in merged:
                    merged[family.name].samples.extend(family.samples)
                else:
                    merged[family.name] = family
        yield from (family for family in merged.values() if family.samples)

    def describe(self) -> Iterable[Metric]:
        # no eager collect at registration: the engine may not be answering yet
        return []


_collector: OffloadCollector | None = None


def watch(engine) -> None:
    """Export the offload stats of ``engine`` (a ``vllm.v1.engine.async_llm.AsyncLLM``) on /metrics."""
    global _collector
    if _collector is None:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            logger.warning(
                "MoE offload metrics are not exported: vLLM serves a multiprocess Prometheus registry "
                "(--api-server-count > 1) that a plugin's collector cannot join; the counters are in the "
                "shutdown log line"
            )
        _collector = OffloadCollector()
        REGISTRY.register(_collector)
    config = engine.vllm_config.model_config
    source = _Source(engine, config.served_model_name or config.model)
    _collector.sources.append(source)
    _ensure_poller(source)


def _ensure_poller(source: _Source) -> None:
    """Start the poller on the running loop (the server's), if there is one and it runs no poller yet."""
    if source.task is not None and not source.task.done():
        return
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return  # built outside an event loop: the first scrape starts it
    source.task = loop.create_task(_poll(source), name="moe-offload-metrics")


async def _poll(source: _Source) -> None:
    # Unconditional: a request of a few tokens starts and ends between two polls, so
    # "requests in flight" would miss it; an idle engine answers in about a millisecond.
    while True:
        engine = source.engine()
        if engine is None or engine.errored:
            return
        try:
            source.latest = list(await engine.collective_rpc("moe_offload_stats"))
        except Exception:  # noqa: BLE001 - a dying engine must not kill the server's loop
            logger.debug("MoE offload stats poll failed", exc_info=True)
            return
        del engine  # no strong reference while sleeping: the engine may be collected
        await asyncio.sleep(POLL_INTERVAL_S)
