"""Reading and checking the plugin's configuration inside vLLM's config objects."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from vllm_moe_offload.core.config import CONFIG_KEY, OffloadConfig
from vllm_moe_offload.core.plan import plan_slots

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.engine.arg_utils import EngineArgs

logger = logging.getLogger("vllm.moe_offload.config")

WORKER_CLASSES = {
    "cpu": "vllm_moe_offload.integration.worker.OffloadCPUWorker",
    "cuda": "vllm_moe_offload.integration.worker.OffloadGPUWorker",
}


def offload_config_of(vllm_config: VllmConfig | None) -> OffloadConfig | None:
    if vllm_config is None:
        return None
    additional = vllm_config.additional_config
    if not isinstance(additional, dict) or not additional.get(CONFIG_KEY):
        return None
    return OffloadConfig.from_dict(additional[CONFIG_KEY])


def current_offload_config() -> OffloadConfig | None:
    """The offload config of the vLLM config being built or run, if any."""
    from vllm.config import get_current_vllm_config_or_none

    return offload_config_of(get_current_vllm_config_or_none())


def before_config(engine_args: EngineArgs) -> OffloadConfig | None:
    """Validate ``additional_config["moe_offload"]`` and pick the plugin's worker.

    Runs in the process the user started, before any engine process exists, so
    a bad setting is reported there with its value and what is allowed.
    """
    additional = engine_args.additional_config
    if not isinstance(additional, dict) or not additional.get(CONFIG_KEY):
        return None
    offload = OffloadConfig.from_dict(additional[CONFIG_KEY])
    engine_args.additional_config = {**additional, CONFIG_KEY: offload.to_dict()}
    if not offload.enabled:
        return None
    from vllm.platforms import current_platform

    kind = "cpu" if current_platform.is_cpu() else "cuda" if current_platform.is_cuda() else None
    if kind is None:
        raise NotImplementedError(
            f"MoE offload runs on the CPU and CUDA backends; this platform is {current_platform.device_name}"
        )
    if engine_args.worker_cls == "auto":
        engine_args.worker_cls = WORKER_CLASSES[kind]
    elif engine_args.worker_cls != WORKER_CLASSES[kind]:
        raise ValueError(
            f"--worker-cls {engine_args.worker_cls} cannot be combined with --moe-offload: the plugin runs "
            f"its own worker ({WORKER_CLASSES[kind]})"
        )
    return offload


def after_config(vllm_config: VllmConfig, offload: OffloadConfig) -> None:
    """Refuse what the offloaded layer cannot do, and check the budget when the model allows."""
    parallel = vllm_config.parallel_config
    if parallel.tensor_parallel_size > 1 or parallel.pipeline_parallel_size > 1:
        raise NotImplementedError(
            "MoE offload runs with tensor_parallel_size=1 and pipeline_parallel_size=1 in this release; "
            f"got TP={parallel.tensor_parallel_size}, PP={parallel.pipeline_parallel_size}"
        )
    if parallel.enable_expert_parallel:
        raise NotImplementedError("MoE offload cannot be combined with expert parallelism in this release")
    geometry = estimate_geometry(vllm_config.model_config.hf_text_config, vllm_config.model_config.dtype.itemsize)
    if geometry is None:
        logger.warning("could not read the MoE geometry from the model config; the budget is checked at load")
        return
    plan = plan_slots(offload.budget, **geometry)  # raises OffloadConfigError when too small
    logger.info(
        "MoE offload: policy %s, budget %s -> about %d of %d experts per layer in %d MoE layers",
        offload.policy.value, offload.budget, plan.slots_per_layer, plan.num_experts, plan.num_layers,
    )


def estimate_geometry(hf_config: Any, dtype_bytes: int) -> dict[str, int] | None:
    """MoE layer count, experts, top-k and bytes per expert from a HF config, if recognisable.

    Covers the conventions of Mixtral, Qwen2/3-MoE, OLMoE and DeepSeek-V2. The
    worker makes the exact check with the kernel's own layout; this early one
    lets a bad budget fail in the user's process.
    """
    num_experts = _first(hf_config, "num_local_experts", "num_experts", "n_routed_experts")
    top_k = _first(hf_config, "num_experts_per_tok", "moe_topk")
    hidden = _first(hf_config, "hidden_size")
    inter = _first(hf_config, "moe_intermediate_size", "intermediate_size")
    num_hidden = _first(hf_config, "num_hidden_layers")
    if None in (num_experts, top_k, hidden, inter, num_hidden) or not num_experts:
        return None
    layers = [i for i in range(num_hidden) if _is_moe_layer(hf_config, i)]
    if not layers:
        return None
    return {
        "num_layers": len(layers),
        "num_experts": num_experts,
        "top_k": top_k,
        "expert_bytes": 3 * hidden * inter * dtype_bytes,
    }


def _first(obj: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(obj, name, None)
        if isinstance(value, int):
            return value
    return None


def _is_moe_layer(cfg: Any, i: int) -> bool:
    if i in (getattr(cfg, "mlp_only_layers", None) or []):
        return False
    first_dense = getattr(cfg, "first_k_dense_replace", None)
    if first_dense is not None:
        return i >= first_dense and i % (getattr(cfg, "moe_layer_freq", 1) or 1) == 0
    step = getattr(cfg, "decoder_sparse_step", None)
    if step:
        return (i + 1) % step == 0
    return True
