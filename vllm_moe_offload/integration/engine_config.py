"""Reading and checking the plugin's configuration inside vLLM's config objects."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from vllm_moe_offload.core.config import (
    CONFIG_KEY,
    Budget,
    OffloadConfig,
    OffloadConfigError,
    Policy,
    format_bytes,
)
from vllm_moe_offload.core.plan import SlotPlan, plan_slots, staging_for

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
    check_parallel(engine_args)  # EngineArgs has the ParallelConfig's field names
    check_expert_tensors(engine_args.model)  # before vLLM itself opens the checkpoint
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


#: the offloaded layer's custom op (integration/experts.py); graphs must not capture it
MOE_OP = "vllm_moe_offload::routed_experts"

#: the MoE backend that takes remapped ids on CUDA: monolithic kernels (FlashInfer
#: TRT-LLM, ...) route inside the kernel and would never see slot ids
CUDA_MOE_BACKEND = "triton"


def after_config(vllm_config: VllmConfig, offload: OffloadConfig) -> None:
    """Refuse what the offloaded layer cannot do, adapt graphs and kernels, and check the budget."""
    parallel = vllm_config.parallel_config
    check_parallel(parallel)
    from vllm.platforms import current_platform

    if current_platform.is_cuda():
        force_moe_backend(vllm_config.kernel_config)
        split_graphs_at_moe(vllm_config.compilation_config)
    if offload.policy is Policy.KLOTSKI and "groups" in offload.klotski_features:
        group_steps(vllm_config.scheduler_config, offload.klotski_max_group)
    if current_platform.is_cpu() and vllm_config.cache_config.kv_cache_memory_bytes is None:
        size_kv_for_offload(vllm_config)
    tp = parallel.tensor_parallel_size
    if offload.budget.auto:
        logger.info(
            "MoE offload: policy %s, budget auto: each worker gives the experts the memory left once the "
            "non-expert weights are loaded, less the KV cache and a working margin (its startup plan says how much)",
            offload.policy.value,
        )
        return
    geometry = estimate_geometry(
        vllm_config.model_config.hf_text_config, _expert_dtype_bytes(vllm_config.model_config), tp_size=tp,
    )
    if geometry is None:
        logger.warning("could not read the MoE geometry from the model config; the budget is checked at load")
        return
    plan = plan_rank_slots(
        offload.budget, tp, io_threads=offload.io_threads, cuda=current_platform.is_cuda(),
        read_span_bytes=checkpoint_expert_span(vllm_config.model_config.model),
        # a kernel store's loads read into the slots: about nothing staged (the worker knows the layout); taken
        # here as a checkpoint read of an expert for a packed store's (a piece of a block: about that)
        staged_load_bytes=0 if offload.kernel_store and offload.store.value == "kernel" else None, **geometry,
    )
    logger.info(
        "MoE offload: policy %s, budget %s -> about %s of %d experts per layer in %d MoE layers%s",
        offload.policy.value, offload.budget, _slot_range(plan.layer_slots), plan.num_experts, plan.num_layers,
        _tp_note(tp),
    )
    if plan.budget_bytes > plan.total_expert_bytes + plan.staging_bytes:
        logger.warning(
            "MoE offload: the budget %s (%d bytes) is more than all experts need with their staging (%d bytes): "
            "every expert stays resident and nothing is offloaded; --moe-offload off gives the same with no "
            "plugin in the path", offload.budget, plan.budget_bytes, plan.total_expert_bytes + plan.staging_bytes,
        )


#: ``additional_config`` key where :func:`size_kv_for_offload` leaves why the KV cache has its size,
#: for the worker's startup plan (the size itself is ``cache_config.kv_cache_memory_bytes``)
KV_NOTE_KEY = "moe_offload_kv_cache"


def size_kv_for_offload(vllm_config: VllmConfig) -> None:
    """Give the KV cache an explicit size where the user gave none (neither --kv-cache-memory-bytes nor
    VLLM_CPU_KVCACHE_SPACE), so that it is counted once, as what it will be, before the experts get the rest.

    Without a size, vLLM's CPU worker asks for ``gpu_memory_utilization`` of all
    the machine's memory (cgroup limits unseen) and gives the KV cache what its
    process does not hold yet: most of a box the experts do not fit. The size
    is ``core.memory_budget.size_kv_cache``'s, from the attention geometry.
    """
    from vllm.utils.torch_utils import kv_cache_dtype_str_to_dtype

    from vllm_moe_offload.core.memory_budget import size_kv_cache
    from vllm_moe_offload.runtime.memory_limit import engine_memory

    model, cache, parallel = vllm_config.model_config, vllm_config.cache_config, vllm_config.parallel_config
    try:
        layers = model.get_num_layers_by_block_type(parallel, "attention")
    except (AttributeError, ValueError, NotImplementedError):
        layers = model.get_num_layers(parallel)
    keys_and_values = 1 if model.use_mla else 2  # MLA caches one latent per token
    dtype = kv_cache_dtype_str_to_dtype(cache.cache_dtype, model)
    per_token = layers * keys_and_values * model.get_num_kv_heads(parallel) * model.get_head_size() * dtype.itemsize
    if per_token < 1:
        return  # no attention layer: nothing to size
    size = size_kv_cache(per_token, cache.block_size or 16, model.max_model_len,
                         vllm_config.scheduler_config.max_num_seqs, engine_memory())
    cache.kv_cache_memory_bytes = size.kv_bytes
    if isinstance(vllm_config.additional_config, dict):
        vllm_config.additional_config[KV_NOTE_KEY] = size.why
    logger.info("MoE offload: KV cache %s (%s)", format_bytes(size.kv_bytes), size.why)


def kv_cache_note(vllm_config: VllmConfig) -> str:
    """Where an explicit KV cache size came from: the plugin's reason, else the user's setting."""
    additional = vllm_config.additional_config
    if isinstance(additional, dict) and additional.get(KV_NOTE_KEY):
        return additional[KV_NOTE_KEY]
    return "VLLM_CPU_KVCACHE_SPACE" if os.environ.get("VLLM_CPU_KVCACHE_SPACE") else "--kv-cache-memory-bytes"


def _slot_range(layer_slots: tuple[int, ...]) -> str:
    """``(4, 3, 3)`` -> ``3-4``: an even split's spare slots give some layers one more."""
    low, high = min(layer_slots), max(layer_slots)
    return str(low) if low == high else f"{low}-{high}"


def check_expert_tensors(model: str) -> None:
    """Refuse a local checkpoint whose expert tensors are truncated or malformed, naming file and tensor.

    Runs in the user's process before any engine starts (the worker checks
    again, and that every expert of every layer is present, when it builds the
    slots). Models from the hub are checked only by the worker.
    """
    index = _local_index(model)
    if index is None:
        return  # a hub model, or not a safetensors checkpoint: vLLM's loader reports it
    problems = [p for name in index.names() if ".experts." in name and (p := index.problem(name))]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ValueError(f"MoE offload: the checkpoint at {model} cannot be offloaded: {problems[0]}{more}")


def check_parallel(parallel: Any) -> None:
    """Tensor parallel is supported (each rank offloads its shard); the rest is refused.

    Pipeline parallel would need the budget split by stage and is untested.
    Expert parallel would need each rank's slot map restricted to its local
    experts, the remap composed with vLLM's global-to-local ``expert_map`` (ids
    arrive global, and all2all backends dispatch tokens before the kernel), and
    the budget split over local experts. Data parallel flattens the MoE layers'
    tensor parallelism across replicas (untested).
    """
    if parallel.pipeline_parallel_size > 1:
        raise NotImplementedError(
            f"MoE offload does not support pipeline parallelism yet (pipeline_parallel_size="
            f"{parallel.pipeline_parallel_size}); allowed: pipeline_parallel_size=1 with any tensor_parallel_size"
        )
    if parallel.enable_expert_parallel:
        raise NotImplementedError(
            "MoE offload cannot be combined with expert parallelism (--enable-expert-parallel) yet: each rank "
            "would hold only its own experts' slots; use tensor parallelism instead (each rank then offloads "
            "its shard of every expert)"
        )
    if parallel.data_parallel_size > 1:
        raise NotImplementedError(
            f"MoE offload does not support data parallelism yet (data_parallel_size="
            f"{parallel.data_parallel_size}); run one engine per replica, or use tensor parallelism"
        )


def per_rank_budget(budget: Budget, tp_size: int) -> Budget:
    """Each tensor-parallel rank's share: a size is split evenly; a share of the experts stays as it is.

    Every rank holds 1/tp of every expert, so a share of "the model's expert
    bytes" means the same share of the rank's shard.
    """
    if tp_size <= 1 or budget.fraction is not None:
        return budget
    assert budget.num_bytes is not None
    return Budget(num_bytes=budget.num_bytes // tp_size)


def plan_rank_slots(
    budget: Budget, tp_size: int, io_threads: int = 1, cuda: bool = False, read_span_bytes: int | None = None,
    staged_load_bytes: int | None = None, **geometry: Any,
) -> SlotPlan:
    """:func:`plan_slots` for one tensor-parallel rank; a too-small budget names the per-rank split.

    The staging of ``io_threads`` loaders (``core.plan.staging_for``) comes out of
    the rank's budget first. ``read_span_bytes`` is the largest read of one
    expert from the checkpoint (:func:`checkpoint_expert_span`); unknown (a hub
    model in the user's process), it is taken as one whole expert in the
    model's dtype: ``expert_bytes`` of every rank's shard. ``staged_load_bytes``
    (host slots loaded from a kernel-layout store, which converts nothing): the
    bytes of one load's read that pass through a read buffer
    (``KernelLayout.staged_read_bytes``); the loads then reserve that read
    buffer and no conversion memory (the store's build runs before any slot
    exists, one expert at a time).
    """
    expert_bytes = geometry["expert_bytes"]
    if staged_load_bytes is not None and not cuda:
        staging = staging_for(io_threads, expert_bytes, staged_load_bytes, convert=False)
    else:
        staging = staging_for(io_threads, expert_bytes, read_span_bytes or expert_bytes * tp_size, cuda)
    try:
        return plan_slots(per_rank_budget(budget, tp_size), staging=staging, **geometry)
    except OffloadConfigError as exc:
        if tp_size <= 1:
            raise
        raise OffloadConfigError(
            f"{exc} [per rank: with tensor_parallel_size={tp_size} each rank offloads its 1/{tp_size} shard "
            f"of every expert with 1/{tp_size} of the budget {budget}]"
        ) from exc


def checkpoint_expert_span(model: str) -> int | None:
    """The largest read of one routed expert from a local safetensors checkpoint; None when not local."""
    index = _local_index(model)
    return index.largest_expert_span() if index is not None else None


def _local_index(model: str):
    """The safetensors index of a local checkpoint folder; None for a hub model or no safetensors."""
    if not os.path.isdir(model):
        return None
    from vllm_moe_offload.runtime.safetensors_io import CheckpointIndex

    try:
        return CheckpointIndex(model)
    except FileNotFoundError:
        return None


def _tp_note(tp_size: int) -> str:
    if tp_size <= 1:
        return ""
    return (
        f" (per rank: each of {tp_size} tensor-parallel ranks offloads its 1/{tp_size} shard of every expert; "
        f"a size budget is split evenly between them, a share applies to each rank's shard)"
    )


def force_moe_backend(kernel_config: Any) -> None:
    """On CUDA, run the MoE kernel that takes (remapped) ``topk_ids`` from outside: Triton."""
    backend = kernel_config.moe_backend
    if backend == "auto":
        logger.info("MoE offload: using moe_backend=%s (its kernels take remapped expert ids)", CUDA_MOE_BACKEND)
        kernel_config.moe_backend = CUDA_MOE_BACKEND
    elif backend != CUDA_MOE_BACKEND:
        raise NotImplementedError(
            f"MoE offload on CUDA needs --moe-backend {CUDA_MOE_BACKEND} (or auto); got {backend!r}, whose kernels "
            "route inside and cannot take slot ids"
        )


def group_steps(scheduler_config: Any, max_group: int) -> None:
    """klotski ``groups``: the plugin's scheduler may widen steps (``integration/scheduler.py``)."""
    from vllm_moe_offload.integration.scheduler import widen_token_budget

    if scheduler_config.scheduler_cls is not None:
        raise ValueError(
            f"--scheduler-cls {scheduler_config.scheduler_cls} cannot be combined with klotski's 'groups' feature, "
            "which runs the plugin's own scheduler; pass --moe-offload-klotski-features without 'groups' "
            "(e.g. hot,reorder) to keep your scheduler"
        )
    base = widen_token_budget(scheduler_config, max_group)
    logger.info(
        "MoE offload (klotski groups): a step may take up to %d x %d tokens while expert loads dominate "
        "(the model runner is sized for %d)", max_group, base, scheduler_config.max_num_batched_tokens,
    )


def split_graphs_at_moe(compilation: Any) -> None:
    """Keep CUDA graphs for everything but the offloaded MoE op.

    The op makes host-side cache decisions (which expert in which slot, loads on
    a miss) that a captured graph would freeze. vLLM's piecewise capture splits
    its graph at ``splitting_ops`` and runs them eagerly between captured pieces,
    so the op goes there; full graphs (which capture splitting ops too) are
    downgraded to piecewise, or to none where nothing is compiled into pieces.
    """
    from vllm.config.compilation import CompilationMode, CUDAGraphMode

    mode = compilation.cudagraph_mode
    if mode is None or mode == CUDAGraphMode.NONE:
        return
    if compilation.mode != CompilationMode.VLLM_COMPILE:
        if mode.has_full_cudagraphs():
            logger.info(
                "MoE offload: cudagraph_mode %s would capture the offloaded MoE op and compilation mode %s "
                "cannot split it out; CUDA graphs are turned off", mode.name, compilation.mode,
            )
            compilation.cudagraph_mode = CUDAGraphMode.NONE
            compilation.max_cudagraph_capture_size = 0
            compilation.cudagraph_capture_sizes = []
        return
    ops = list(compilation.splitting_ops or [])
    if MOE_OP not in ops:
        compilation.splitting_ops = [*ops, MOE_OP]
    if mode.has_full_cudagraphs():
        logger.info(
            "MoE offload: cudagraph_mode %s would capture the offloaded MoE op's host-side decisions; "
            "using PIECEWISE (graphs split at %s, which runs eagerly)", mode.name, MOE_OP,
        )
        compilation.cudagraph_mode = CUDAGraphMode.PIECEWISE


def estimate_geometry(hf_config: Any, dtype_bytes: float, tp_size: int = 1) -> dict[str, int] | None:
    """MoE layer count, experts, top-k and bytes per expert (one rank's shard) from a HF config.

    Covers the conventions of Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2, Gemma-4 and Llama-4. The
    worker makes the exact check with the kernel's own layout; this early one
    lets a bad budget fail in the user's process.
    """
    num_experts = _first(hf_config, "num_local_experts", "num_experts", "n_routed_experts")
    top_k = _first(hf_config, "num_experts_per_tok", "moe_topk", "top_k_experts")  # top_k_experts: Gemma-4
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
        "expert_bytes": int(3 * hidden * (inter // tp_size) * dtype_bytes),
    }


def _expert_dtype_bytes(model_config) -> float:
    """Bytes of one expert weight value: 1 for an FP8 checkpoint, 0.5 for an AWQ or GPTQ int4 one (their
    small scales and zero points left out: the worker's exact check counts them), else the model's dtype."""
    quant = getattr(model_config.hf_config, "quantization_config", None)
    if isinstance(quant, dict) and quant.get("quant_method") == "fp8" and model_config.quantization == "fp8":
        return 1
    # vLLM's names for the checkpoint's "awq" / "gptq" on the CPU backend
    int4 = (("awq", "awq"), ("gptq", "auto_gptq"))
    if isinstance(quant, dict) and quant.get("bits") == 4 and (
        (quant.get("quant_method"), model_config.quantization) in int4
    ):
        return 0.5
    return model_config.dtype.itemsize


def _first(obj: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(obj, name, None)
        if isinstance(value, int):
            return value
    return None


def _is_moe_layer(cfg: Any, i: int) -> bool:
    if i in (getattr(cfg, "mlp_only_layers", None) or []):
        return False
    moe_layers = getattr(cfg, "moe_layers", None)  # Llama-4: the MoE layers listed
    if isinstance(moe_layers, list):
        return i in moe_layers
    first_dense = getattr(cfg, "first_k_dense_replace", None)
    if first_dense is not None:
        return i >= first_dense and i % (getattr(cfg, "moe_layer_freq", 1) or 1) == 0
    step = getattr(cfg, "decoder_sparse_step", None)
    if step:
        return (i + 1) % step == 0
    return True
