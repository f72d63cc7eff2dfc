"""Building the offload runtime for a loaded model: plan, tiers, slot pools, startup log."""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from vllm_moe_offload.core.cache import SlotMap
from vllm_moe_offload.core.config import (
    Budget,
    OffloadConfig,
    OffloadConfigError,
    Policy,
    Quant,
    Store,
    Tier,
    format_bytes,
)
from vllm_moe_offload.core.memory_budget import (
    KV_SHARE_WHEN_UNSET,
    AutoBudget,
    choose_auto_budget,
    kv_bytes_when_unset,
)
from vllm_moe_offload.core.plan import SlotPlan
from vllm_moe_offload.core.predictive import NextUsePolicy, link_layers
from vllm_moe_offload.core.replacement import make_policy
from vllm_moe_offload.core.resident import choose_resident_layers, extra_slot_order, layer_demand
from vllm_moe_offload.core.correlation import CorrelationTable
from vllm_moe_offload.core.stats import layer_recall, summarize
from vllm_moe_offload.integration import layer_ahead, policy_inputs, token_prefetch
from vllm_moe_offload.integration.token_prefetch import TokenPrefetch
from vllm_moe_offload.integration.checkpoint_layout import checkpoint_folder, expert_layouts
from vllm_moe_offload.integration.engine_config import kv_cache_note, offload_config_of, plan_rank_slots
from vllm_moe_offload.integration.experts import (
    OffloadRoutedExperts,
    attach_slots,
    link_prediction,
    offloaded_layers,
)
from vllm_moe_offload.integration.layer_classes import refuse_unoffloaded
from vllm_moe_offload.integration.shared_slots import SharedSlots, shared_pool
from vllm_moe_offload.integration.kernel_format import conversion_identity, describe_conversion, make_converter
from vllm_moe_offload.integration.quantized_experts import expert_param_names, one_expert_bytes
from vllm_moe_offload.integration.observer import RoutingObserver, make_table, profile_warm_set
from vllm_moe_offload.runtime.expert_store import (
    PACKED,
    ExpertStore,
    KernelLayout,
    LayerSpec,
    open_or_build,
    store_directory,
)
from vllm_moe_offload.runtime import packed_codec
from vllm_moe_offload.runtime.kernel_source import KernelSource
from vllm_moe_offload.runtime.ledger import BudgetLedger, MemoryKind
from vllm_moe_offload.runtime.memory import Populator, return_large_frees_to_the_os
from vllm_moe_offload.runtime.memory_limit import engine_memory
from vllm_moe_offload.runtime.quant_source import QuantSource
from vllm_moe_offload.runtime.safetensors_io import CheckpointIndex, ThreadLocalReaders
from vllm_moe_offload.runtime.cuda_transfer import make_transfer_engine
from vllm_moe_offload.runtime.slots import LayerSlots, slot_pool
from vllm_moe_offload.runtime.expert_layout import ExpertLayout
from vllm_moe_offload.runtime.tiers import DiskSource, ExpertSource, HostSource
from vllm_moe_offload.runtime.transfer import LinkEmulator, TransferEngine

logger = logging.getLogger("vllm.moe_offload.setup")


@dataclass
class OffloadRuntime:
    """Everything offload holds in one worker."""

    config: OffloadConfig
    plan: SlotPlan
    tier: Tier
    layers: list[LayerSlots]
    engine: TransferEngine
    readers: ThreadLocalReaders
    link: LinkEmulator
    predicted_layers: int = 0
    observer: RoutingObserver | None = None
    #: batch-1 decode's loads ahead from the step's input token (``token_prefetch.py``; None: off)
    token_prefetch: TokenPrefetch | None = None
    #: layers that load the next one's first experts ahead in steps of several tokens (``layer_ahead.py``)
    layers_ahead: int = 0
    #: every fast-memory allocation for experts (slots, read buffers, conversion, CUDA staging ring)
    ledger: BudgetLedger | None = None
    #: what ``budget auto`` chose and why (None for a size or share budget)
    auto_budget: AutoBudget | None = None
    #: the KV cache's explicit size and where it came from (None: vLLM sizes it from its memory share)
    kv_cache: str | None = None
    #: pages the host slot pools in on a background thread (``runtime/memory.py``)
    populator: Populator | None = None

    def stats(self) -> dict:
        per_layer = [slots.stats_dict() for slots in self.layers]
        return {
            "policy": self.config.policy.value,
            "tier": self.tier.value,
            "budget_bytes": self.plan.budget_bytes,
            "slot_bytes": self.plan.slot_bytes,
            "staging_bytes": self.plan.staging_bytes,  # reserved for read buffers, conversion, CUDA ring
            **(self.ledger.stats() if self.ledger is not None else {}),  # held / peak bytes, by kind
            "slots_per_layer": self.plan.slots_per_layer,
            "layer_slots": list(self.plan.layer_slots),
            # "shared": the layers with fewer slots than experts hold them in one pool (core/shared_pool.py)
            "pool": "shared" if any(slots.pooled for slots in self.layers) else "layer",
            "num_experts": self.plan.num_experts,
            "expert_bytes": self.plan.expert_bytes,
            "link": self.link.describe(),
            # how loads reach kernel layout: vLLM's conversion into fresh tensors, or prepacked into the slot
            "conversion": sorted({d for d in map(_conversion_of, self.layers) if d}),
            # how the layers' kernel is called (integration/cpu_kernel.py); empty before the first step
            "kernel": sorted({slots.kernel_path for slots in self.layers if slots.kernel_path}),
            "predicted_layers": self.predicted_layers,
            "layers": per_layer,
            "total": summarize(per_layer),
            **({"klotski": self.observer.stats()} if self.observer is not None else {}),
        }

    def close(self) -> None:
        if self.observer is not None and self.config.save_profile:
            if self.config.policy is Policy.FATE:  # what the next start's resident layers are chosen from
                self.observer.table.note_recall(layer_recall(slots.stats for slots in self.layers))
            path = self.observer.table.save(self.config.save_profile, source="serving")
            logger.info("MoE offload: activation profile written to %s", path)
        if self.populator is not None:
            self.populator.stop()
        self.engine.shutdown()
        self.readers.close()
        for slots in self.layers:
            slots.source.close()


def build_offload(model: torch.nn.Module, vllm_config) -> OffloadRuntime | None:
    """Give every offloaded MoE layer of ``model`` its slot pool; None when offload is off."""
    config = offload_config_of(vllm_config)
    if config is None or not config.enabled:
        return None
    layers = offloaded_layers(model)
    refuse_unoffloaded(model, vllm_config.model_config.model)  # a MoE layer offload does not hold: no start
    if not layers:
        logger.warning(
            "MoE offload is on (policy %s) but %s has no MoE layers; the model runs unchanged",
            config.policy.value, vllm_config.model_config.model,
        )
        return None
    started = time.perf_counter()
    return_large_frees_to_the_os()
    first = layers[0]
    expert_bytes = one_expert_bytes(first)
    index = CheckpointIndex(checkpoint_folder(vllm_config))
    layouts = expert_layouts(model, layers, index)  # by vLLM's expert mapping: per-expert or stacked tensors
    for layer in layers:
        layer.checkpoint_layout = layouts[layer.layer_name]
    # a saved profile is read once: it may choose fate's resident layers and starts the observer's table
    profile = make_table(layers, config.profile, vllm_config.model_config.model) if config.profile else None
    _release_placeholders(layers)  # before auto measures what is left, and before any slot exists
    budget, auto = _resolve_budget(config, vllm_config, first.w13_weight.device, first.moe_config.tp_size)
    # tensor parallel: each rank plans its own shard of every expert with 1/tp of a size budget;
    # the staging of the loads (read buffers, conversion, CUDA ring) comes out of it first
    plan_with = functools.partial(
        plan_rank_slots, budget, first.moe_config.tp_size, io_threads=config.io_threads,
        cuda=first.w13_weight.device.type == "cuda", read_span_bytes=_read_span_bytes(first, index, config),
        staged_load_bytes=_kernel_load_staging(first, config),
        num_layers=len(layers), num_experts=first.global_num_experts, top_k=first.top_k, expert_bytes=expert_bytes,
        # automatic: a resident layer must leave the predicted layers room to over-fetch
        min_rest_slots=2 * first.top_k if config.resident_layers is None else None,
        # the slots an even split leaves go to the layers a profile shows gain most (else spread evenly)
        extra_order=extra_slot_order(layer_demand(profile.counts, profile.top_k)) if profile is not None else None,
    )
    tier = _resolve_tier(config.tier, first.w13_weight.device, config)
    try:
        plan = plan_with(resident_layers=_resident_layers(config, profile, plan_with, tier))
    except OffloadConfigError as exc:
        if auto is None:
            raise
        raise OffloadConfigError(f"{auto.explain()}; {exc}") from None
    ledger = BudgetLedger(plan.budget_bytes)
    if first.moe_config.tp_size > 1:
        logger.info(
            "MoE offload on tensor-parallel rank %d of %d: slots hold this rank's shard of each expert; "
            "budget for this rank %s (the budget %s shared by %d ranks)", first.moe_config.tp_rank,
            first.moe_config.tp_size, format_bytes(plan.budget_bytes), config.budget, first.moe_config.tp_size,
        )
    # one fetch per I/O thread at a time, each with the conversion temporaries the plan reserved
    convert_bytes = plan.staging.convert_bytes if plan.staging is not None else 0
    readers = ThreadLocalReaders(config.direct_io, lanes=config.io_threads, ledger=ledger, convert_bytes=convert_bytes)
    engine = make_transfer_engine(
        first.w13_weight.device, config.io_threads, expert_bytes, ledger=ledger, stuck_after_s=config.io_stuck_s,
    )
    engine.schedule_prefetches = config.link_schedule  # core/link.py
    link = LinkEmulator(config.link_gbps, config.link_latency_ms)
    runtime = OffloadRuntime(config, plan, tier, [], engine, readers, link, ledger=ledger, auto_budget=auto,
                             kv_cache=_kv_cache_text(vllm_config))
    store = _open_store(layers, index, readers, config, plan)
    shared = shared_pool(layers, plan, config, ledger)
    for layer, num_slots in zip(layers, plan.layer_slots):
        source = _source_for(layer, index, readers, tier, store)
        runtime.layers.append(_slots_for(layer, num_slots, plan, source, config, engine, link, ledger, shared))
    if shared is not None and all(isinstance(view.policy, NextUsePolicy) for view in shared.pool.views):
        # the pool's layers in run order share one step's routing: nextuse's path neighbours (core/predictive.py)
        link_layers([view.policy for view in shared.pool.views], plan.num_experts)
    runtime.observer = _observer(layers, config, vllm_config, profile)
    policy_inputs.attach(model, runtime.layers)  # the step's token, for a policy that keys by it (nextuse)
    if config.token_prefetch_on:
        runtime.token_prefetch = token_prefetch.attach(model, layers, gated=config.prefetch_gate)
    for ordinal, slots in enumerate(runtime.layers):
        slots.warm(_warm_set(runtime.observer, config, ordinal, slots))
    # the slots' pages, mapped now rather than by the first loads into them (they made the first request slow)
    runtime.populator = Populator([pool for slots in runtime.layers for pool in slots.pools]).start()
    if config.layer_ahead_on:
        runtime.layers_ahead = layer_ahead.attach(model, layers, layer_ahead.MIN_TOKENS)
    if config.policy is Policy.FATE:
        runtime.predicted_layers = link_prediction(model, layers, config.overfetch, io_lanes=config.io_threads)
        for layer in layers:
            layer.gate_prefetches = config.prefetch_gate
    _log_plan(runtime, vllm_config, time.perf_counter() - started)
    return runtime


def _release_placeholders(layers: list[OffloadRoutedExperts]) -> None:
    """Give back the memory of the one-expert placeholders vLLM's loader made (``experts.py``).

    From here on they are read for their shape, dtype and device only (the slot
    pools, the converters and the kernel store take those), so each keeps its
    Parameter (a quantized kernel's config holds the object) with one element
    expanded to its shape. Their memory, one expert per layer (576 MiB for 6
    layers of 96 MiB experts), would otherwise stay in use until the slot pool
    replaced it: ``auto`` counted it as taken, and the slots were allocated
    beside it.
    """
    for layer in layers:
        for name in expert_param_names(layer):
            param = getattr(layer, name)
            param.data = torch.empty((1,) * param.dim(), dtype=param.dtype, device=param.device).expand(param.shape)


def _resolve_budget(config: OffloadConfig, vllm_config, device: torch.device, tp_size: int):
    """(the budget to plan with, what ``auto`` chose or None): ``auto`` becomes a size here, in the worker.

    Measured once the non-expert weights are loaded and before the slots and the
    KV cache exist, so what is left for both is known (``core/memory_budget.py``).
    """
    if not config.budget.auto:
        return config.budget, None
    if device.type != "cpu":
        raise OffloadConfigError(
            "budget auto is chosen from host memory and is for vLLM's CPU backend in this release; "
            "on CUDA give a size (e.g. 12GiB) or a share of the expert bytes (e.g. 50%)"
        )
    import psutil  # a dependency of vLLM

    cache_config = vllm_config.cache_config
    # the user's size, or the plugin's (engine_config.size_kv_for_offload)
    if cache_config.kv_cache_memory_bytes is not None:
        kv_bytes, note = cache_config.kv_cache_memory_bytes, kv_cache_note(vllm_config)
    else:
        share = cache_config.gpu_memory_utilization
        requested = int(share * psutil.virtual_memory().total)
        kv_bytes = kv_bytes_when_unset(requested, psutil.Process().memory_info().rss)
        note = (f"{KV_SHARE_WHEN_UNSET:.0%} of what vLLM's share of memory (--gpu-memory-utilization {share:g}) "
                "leaves after the weights; --kv-cache-memory-bytes sets it")
    auto = choose_auto_budget(engine_memory(), kv_bytes, tp_size, note, psutil.Process().memory_info().rss)
    logger.info("MoE offload: %s", auto.explain())
    return Budget(num_bytes=auto.budget_bytes), auto


def _kv_cache_text(vllm_config) -> str | None:
    kv_bytes = vllm_config.cache_config.kv_cache_memory_bytes
    return None if kv_bytes is None else f"{format_bytes(kv_bytes)} ({kv_cache_note(vllm_config)})"


#: In a shared pool the pool's rule evicts (``core/shared_pool.py``); when the user gives no ``replacement``
#: and one expert weighs at least this much, its layers run ``nextuse``, whose predicted uses enter the rule
#: (else the offload policy's own cache, which only says what a prefetch spares). The predictions cost the
#: engine's thread work at every eviction; measured in-process, batch-1 decode at 25%, against the rule on
#: counts alone: the 9 GiB tiny-pymoe copy (96 MiB experts) 10% fewer loads and 7-12% less time; tiny-mixtral
#: copies, whose routing they barely help (1.4% fewer loads), level with 18 MiB experts and 20% slower with 3 MiB
PREDICTED_POOL_MIN_EXPERT_BYTES = 16 * 2**20

#: the cache policy behind each offload policy unless ``replacement`` says otherwise (Fate caches deep layers with ARC)
_CACHE_POLICY = {
    Policy.ONDEMAND: "ondemand", Policy.LRU: "lru", Policy.FATE: "arc", Policy.KLOTSKI: "lru", Policy.EAP: "lru",
}


def _observer(
    layers, config: OffloadConfig, vllm_config, profile: CorrelationTable | None,
) -> RoutingObserver | None:
    """Klotski's routing observer; also for any policy that starts from (``profile``) or saves a profile."""
    predictors = {Policy.KLOTSKI: "klotski", Policy.EAP: "eap"}
    if config.policy not in predictors and config.profile is None and config.save_profile is None:
        return None
    table = profile or make_table(layers, None, vllm_config.model_config.model)
    observer = RoutingObserver(
        table, layers, predict=predictors.get(config.policy), kv_max_seqs=vllm_config.scheduler_config.max_num_seqs,
        features=config.klotski_features,
        max_group=config.klotski_max_group if "groups" in config.klotski_features else 1,
        io_lanes=config.io_threads, gate_prefetches=config.prefetch_gate,
    )
    for layer in layers:
        layer.observer = observer
        # klotski without "reorder" (ablation): a pass waits for all its experts, in packing order
        layer.ready_first = config.policy is not Policy.KLOTSKI or "reorder" in config.klotski_features
    return observer


def _warm_set(observer: RoutingObserver | None, config: OffloadConfig, ordinal: int, slots: LayerSlots):
    """With a profile, a cached layer starts with the experts the profile saw most (None: policy's own)."""
    if observer is None or config.profile is None or slots.fully_resident or config.policy is Policy.ONDEMAND:
        return None
    return profile_warm_set(observer.table, ordinal, slots.num_slots) or None


def _resident_layers(
    config: OffloadConfig, profile: CorrelationTable | None, plan_with: Callable[..., SlotPlan], tier: Tier,
) -> int:
    """How many leading layers Fate keeps whole.

    Without a profile nothing says which layers are busy: the first layer, which
    nothing predicts, is kept whole where the other layers' loads come from host
    memory (a fast link, where prefetches hide them behind compute), and none
    where they come from disk: there a load outlasts a layer's compute, a
    prefetch hides little of it, and layer 0's slots serve more spread over all
    layers (trained tiny-pymoe x64 at 50%, kernel store, default engine: decode
    136.1 tok/s with none against 102.2 with layer 0 whole, batch 168.3 against
    134.6, prefill 2200 against 2004; `docs/bench/fate-resident/`).

    With a saved profile and no explicit ``resident_layers``, the count of leading
    resident layers with the fewest expected expert loads per token under this
    budget (``core.resident``): each resident layer's misses go, the others share
    fewer slots; each layer's misses come from the profile's per-layer expert
    counts. ``plan_with(resident_layers=R)`` is the budget's plan for ``R``. Every
    load counts in full: the profile does not record how much of a prefetch's
    load compute hid, and on a slow link (a load lasting many layers' compute)
    it hides almost nothing, so the measured recall is logged, not weighed.
    """
    if config.policy is not Policy.FATE:
        return 0
    if config.resident_layers is not None:
        return config.resident_layers
    if profile is None:
        return 1 if tier is Tier.HOST else 0
    demand = layer_demand(profile.counts, profile.top_k)
    # from 0: measured, keeping no layer whole loaded least on this host (trained tiny Mixtral at 50%, replay:
    # 1194 loads with none resident, 1729 with layer 0); layer 0 is then an ordinary demand-cached layer
    choice = choose_resident_layers(demand, lambda r: plan_with(resident_layers=r).layer_slots,
                                    profile.prediction_recall, hidden=0.0, min_resident=0)
    recall = profile.prediction_recall
    logger.info(
        "MoE offload: fate keeps the first %d MoE layers resident: the fewest expected expert loads per token "
        "under budget %s from profile %s (by resident layers: %s); prediction recall by layer: %s",
        choice.resident_layers, config.budget, config.profile, choice.describe(),
        "not measured" if recall is None else ", ".join("-" if np.isnan(r) else f"{r:.2f}" for r in recall),
    )
    return choice.resident_layers


def _resolve_tier(tier: Tier, device: torch.device, config: OffloadConfig) -> Tier:
    if tier is not Tier.AUTO:
        return tier
    if config.quant is not Quant.NONE or config.store is not Store.CHECKPOINT:
        return Tier.DISK  # quantized or kernel-layout experts are read from their store on disk
    return Tier.DISK if device.type == "cpu" else Tier.HOST


def _names(layer: OffloadRoutedExperts) -> ExpertLayout:
    return layer.checkpoint_layout


def _open_store(
    layers: list[OffloadRoutedExperts], index, readers, config: OffloadConfig, plan: SlotPlan,
) -> ExpertStore | None:
    """The quantized or kernel-layout expert store (built on first use, rebuilt when stale); None without."""
    if config.quant is Quant.NONE and config.store is Store.CHECKPOINT:
        return None
    import vllm.envs as envs

    root = config.cache_dir or os.path.join(envs.VLLM_CACHE_ROOT, "moe_offload", "stores")
    specs = [LayerSpec(_names(layer), layer.global_num_experts) for layer in layers]
    if config.quant is not Quant.NONE:
        scheme = config.quant.value
        return open_or_build(index, specs, scheme, store_directory(root, index.folder, scheme), readers)
    # the build (before any slot exists) converts one expert at a time with its own reader; the loads read
    # into the slots and stage only what is not aligned, or a piece of a packed block (``_kernel_load_staging``)
    kernel = _kernel_layout(layers, readers)
    moe = layers[0].moe_config
    scheme = config.store.value
    if scheme == PACKED and layers[0].w13_weight.device.type != "cpu":
        raise OffloadConfigError(
            f"store 'packed' decodes experts on the CPU into host slots; this engine's experts are on "
            f"{layers[0].w13_weight.device.type}: use store 'kernel'"
        )
    label = f"{scheme}-tp{moe.tp_rank}of{moe.tp_size}"  # each rank stores its own shard
    return open_or_build(index, specs, scheme, store_directory(root, index.folder, label), readers, kernel)


def _kernel_load_staging(first: OffloadRoutedExperts, config: OffloadConfig) -> int | None:
    """Bytes of one load's read that pass through a read buffer when loads come from a kernel store into host
    slots (``KernelLayout.staged_read_bytes``; a packed store's piece of a block); None when loads convert
    (checkpoint or quantized store)."""
    if not config.kernel_store or first.w13_weight.device.type != "cpu":
        return None
    layout = _kernel_layout([first])
    return layout.packed_piece_bytes if config.store is Store.PACKED else layout.staged_read_bytes


def _kernel_layout(layers: list[OffloadRoutedExperts], readers=None) -> KernelLayout:
    """What a kernel store of these layers holds on this rank, and the converters that write it
    (without ``readers``: the block's shape only, no identity or converters)."""
    import vllm

    first = layers[0]
    # [1, ...] placeholders in kernel layout: w13, w2 and a quantized layer's scales
    w13, w2, *extra = ((tuple(p.shape[1:]), p.dtype) for p in (getattr(first, n) for n in expert_param_names(first)))
    if readers is None:
        return KernelLayout({}, w13, w2, (), tuple(extra))
    converters = [make_converter(layer, readers.scratch) for layer in layers]
    moe = first.moe_config
    identity = {
        "vllm": vllm.__version__, "torch": torch.__version__, **conversion_identity(converters[0]),
        "tp_rank": moe.tp_rank, "tp_size": moe.tp_size,
    }
    return KernelLayout(identity, w13, w2, converters, tuple(extra))


def _read_span_bytes(first: OffloadRoutedExperts, index: CheckpointIndex, config: OffloadConfig) -> int | None:
    """The largest single read of one expert: from the checkpoint, or a kernel store's block when larger
    (a quantized checkpoint's scales lie apart from its weights, read separately; the block holds both)."""
    span = index.largest_expert_span()
    if config.kernel_store and first.expert_format is not None:
        layout = _kernel_layout([first])
        return max(span or 0, layout.packed_piece_bytes if config.store is Store.PACKED else layout.expert_bytes)
    return span


def _conversion_of(slots: LayerSlots) -> str | None:
    """How a layer's loads reach kernel layout (``describe_conversion``; stores convert when written)."""
    if isinstance(slots.source, KernelSource):
        if slots.source.store.scheme == PACKED:
            return f"none (read in kernel layout from the packed store, decoded by {packed_codec.implementation()})"
        return "none (read in kernel layout from the kernel store)"
    return describe_conversion(getattr(slots.source, "convert", None))  # the host tier has none


def _source_for(
    layer: OffloadRoutedExperts, index, readers, tier: Tier, store: ExpertStore | None = None
) -> ExpertSource:
    names = _names(layer)
    if store is not None and store.kernel is not None:
        return KernelSource(store, names.prefix, readers)
    convert = make_converter(layer, readers.scratch)
    if store is not None:
        return QuantSource(store, names.prefix, convert, readers, layer.params_dtype)
    disk = DiskSource(index, names, convert, readers, num_experts=layer.global_num_experts)
    if tier is Tier.DISK:
        return disk
    return HostSource(disk, layer.global_num_experts, pin=layer.w13_weight.device.type == "cuda")


def layer_policy_name(config: OffloadConfig, pooled: bool, expert_bytes: int) -> str:
    """The replacement policy a layer's slots run: the user's, else ``nextuse`` in a shared pool of large
    experts (its predictions enter the pool's rule), else the offload policy's own cache."""
    if config.replacement:
        return config.replacement
    if pooled and expert_bytes >= PREDICTED_POOL_MIN_EXPERT_BYTES:
        return NextUsePolicy.name
    return _CACHE_POLICY[config.policy]


def _slots_for(
    layer, num_slots: int, plan: SlotPlan, source, config: OffloadConfig, engine, link, ledger: BudgetLedger,
    shared: SharedSlots | None = None,
) -> LayerSlots:
    pooled = shared is not None and layer.layer_name in shared.ordinal
    replacement = layer_policy_name(config, pooled, one_expert_bytes(layer))
    policy = make_policy(replacement, plan.num_experts, num_slots, layer.top_k)
    if pooled:
        w13_slots, w2_slots, *extra_slots = shared.tensors
        slot_map = shared.pool.view(shared.ordinal[layer.layer_name]).attach(policy)
    else:
        # [1, ...] placeholders in kernel layout: w13, w2 and a quantized layer's scales
        placeholders = [getattr(layer, name) for name in expert_param_names(layer)]
        pool_bytes = num_slots * one_expert_bytes(layer)
        ledger.reserve(MemoryKind.SLOTS, pool_bytes, f"the slot pool of layer {layer.layer_idx} ({num_slots} slots)")
        # host pools start aligned for direct I/O where a slot's bytes allow: the kernel store reads into them
        w13_slots, w2_slots, *extra_slots = (slot_pool(num_slots, tuple(p.shape[1:]), p.dtype, p.device)
                                             for p in placeholders)
        slot_map = SlotMap(plan.num_experts, num_slots, policy)
    slots = LayerSlots(
        layer.layer_idx, w13_slots, w2_slots, slot_map, source, engine, link,
        load_timeout_s=config.load_timeout_s, extra_slots=extra_slots, share=num_slots,
    )
    attach_slots(layer, slots)
    return slots


def _log_plan(runtime: OffloadRuntime, vllm_config, took_s: float) -> None:
    from vllm_moe_offload.integration.startup_plan import log_startup_plan, other_processes

    log_startup_plan(runtime, vllm_config.model_config.model, took_s, other_processes(vllm_config.parallel_config))
