"""Building the offload runtime for a loaded model: plan, tiers, slot pools, startup log."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import torch

from vllm_moe_offload.core.cache import SlotMap, make_policy
from vllm_moe_offload.core.config import OffloadConfig, Policy, Tier, format_bytes
from vllm_moe_offload.core.plan import SlotPlan, plan_slots
from vllm_moe_offload.core.stats import summarize
from vllm_moe_offload.integration.engine_config import offload_config_of
from vllm_moe_offload.integration.experts import (
    OffloadRoutedExperts,
    attach_slots,
    link_prediction,
    offloaded_layers,
)
from vllm_moe_offload.integration.kernel_format import make_converter
from vllm_moe_offload.runtime.memory import return_large_frees_to_the_os
from vllm_moe_offload.runtime.safetensors_io import CheckpointIndex, ThreadLocalReaders
from vllm_moe_offload.runtime.slots import LayerSlots
from vllm_moe_offload.runtime.tiers import CheckpointNames, DiskSource, ExpertSource, HostSource
from vllm_moe_offload.runtime.transfer import LinkEmulator, ThreadTransferEngine

logger = logging.getLogger("vllm.moe_offload.setup")


@dataclass
class OffloadRuntime:
    """Everything offload holds in one worker."""

    config: OffloadConfig
    plan: SlotPlan
    tier: Tier
    layers: list[LayerSlots]
    engine: ThreadTransferEngine
    readers: ThreadLocalReaders
    link: LinkEmulator
    predicted_layers: int = 0

    def stats(self) -> dict:
        per_layer = [slots.stats_dict() for slots in self.layers]
        return {
            "policy": self.config.policy.value,
            "tier": self.tier.value,
            "budget_bytes": self.plan.budget_bytes,
            "slot_bytes": self.plan.slot_bytes,
            "slots_per_layer": self.plan.slots_per_layer,
            "layer_slots": list(self.plan.layer_slots),
            "num_experts": self.plan.num_experts,
            "expert_bytes": self.plan.expert_bytes,
            "link": self.link.describe(),
            "predicted_layers": self.predicted_layers,
            "layers": per_layer,
            "total": summarize(per_layer),
        }

    def close(self) -> None:
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
    if not layers:
        logger.warning(
            "MoE offload is on (policy %s) but %s has no MoE layers; the model runs unchanged",
            config.policy.value, vllm_config.model_config.model,
        )
        return None
    started = time.perf_counter()
    return_large_frees_to_the_os()
    first = layers[0]
    expert_bytes = first.w13_weight[0].nbytes + first.w2_weight[0].nbytes  # kernel layout, padding included
    plan = plan_slots(
        config.budget, len(layers), first.global_num_experts, first.top_k, expert_bytes,
        resident_layers=_resident_layers(config),
        # automatic: a resident layer must leave the predicted layers room to over-fetch
        min_rest_slots=2 * first.top_k if config.resident_layers is None else None,
    )
    tier = _resolve_tier(config.tier, first.w13_weight.device)
    index = CheckpointIndex(_checkpoint_folder(vllm_config))
    readers = ThreadLocalReaders(config.direct_io)
    engine = ThreadTransferEngine(config.io_threads)
    link = LinkEmulator(config.link_gbps, config.link_latency_ms)
    runtime = OffloadRuntime(config, plan, tier, [], engine, readers, link)
    for layer, num_slots in zip(layers, plan.layer_slots):
        source = _source_for(layer, index, readers, tier)
        runtime.layers.append(_slots_for(layer, num_slots, plan, source, config, engine, link))
    for slots in runtime.layers:
        slots.warm()
    if config.policy is Policy.FATE:
        runtime.predicted_layers = link_prediction(model, layers, config.overfetch)
    _log_plan(runtime, vllm_config, time.perf_counter() - started)
    return runtime


#: the cache policy behind each offload policy (Fate caches deep layers with ARC)
_CACHE_POLICY = {Policy.ONDEMAND: "ondemand", Policy.LRU: "lru", Policy.FATE: "arc"}


def _resident_layers(config: OffloadConfig) -> int:
    """Fate keeps shallow layers whole: at least the first, which nothing can predict."""
    if config.policy is not Policy.FATE:
        return 0
    return 1 if config.resident_layers is None else config.resident_layers


def _resolve_tier(tier: Tier, device: torch.device) -> Tier:
    if tier is not Tier.AUTO:
        return tier
    return Tier.DISK if device.type == "cpu" else Tier.HOST


def _checkpoint_folder(vllm_config) -> str:
    model = vllm_config.model_config.model
    if os.path.isdir(model):
        return model
    from huggingface_hub import snapshot_download

    return snapshot_download(
        model, revision=vllm_config.model_config.revision, allow_patterns=["*.safetensors"],
        cache_dir=vllm_config.load_config.download_dir, local_files_only=True,
    )


def _source_for(layer: OffloadRoutedExperts, index, readers, tier: Tier) -> ExpertSource:
    names = CheckpointNames(
        prefix=layer.layer_name, gate=layer.ckpt_gate_proj_name, up=layer.ckpt_up_proj_name,
        down=layer.ckpt_down_proj_name,
    )
    disk = DiskSource(index, names, make_converter(layer), readers)
    if tier is Tier.DISK:
        return disk
    return HostSource(disk, layer.global_num_experts, pin=layer.w13_weight.device.type == "cuda")


def _slots_for(layer, num_slots: int, plan: SlotPlan, source, config: OffloadConfig, engine, link) -> LayerSlots:
    w13, w2 = layer.w13_weight, layer.w2_weight  # [1, ...] placeholders in kernel layout
    w13_slots = torch.empty((num_slots, *w13.shape[1:]), dtype=w13.dtype, device=w13.device)
    w2_slots = torch.empty((num_slots, *w2.shape[1:]), dtype=w2.dtype, device=w2.device)
    policy = make_policy(_CACHE_POLICY[config.policy], plan.num_experts, num_slots, layer.top_k)
    slots = LayerSlots(
        layer.layer_idx, w13_slots, w2_slots, SlotMap(plan.num_experts, num_slots, policy), source, engine, link,
    )
    attach_slots(layer, slots)
    return slots


def _log_plan(runtime: OffloadRuntime, vllm_config, took_s: float) -> None:
    plan = runtime.plan
    logger.info(
        "MoE offload ready in %.2f s: policy %s, %d MoE layers (%d fully resident, %d predicted), "
        "%d/%d experts per offloaded layer (%s of slots for a budget of %s; all experts %s), %s tier%s, %s",
        took_s, runtime.config.policy.value, plan.num_layers, plan.resident_layers, runtime.predicted_layers,
        plan.slots_per_layer, plan.num_experts,
        format_bytes(plan.slot_bytes), format_bytes(plan.budget_bytes), format_bytes(plan.total_expert_bytes),
        runtime.tier.value, " (direct I/O)" if runtime.config.direct_io and runtime.tier is Tier.DISK else "",
        runtime.link.describe(),
    )
