"""gpt-oss's MoE layer, ``GptOssRoutedExperts``, offloaded when its experts are MXFP4.

gpt-oss stores each layer's experts stacked, with biases: ``mlp.experts.gate_up_proj_blocks``
(uint8 ``[E, 2I, H/32, 16]``, gate and up rows interleaved), ``..._scales`` (uint8 ``[E, 2I, H/32]``),
``..._bias`` (``[E, 2I]``) and the same for ``down_proj``. vLLM names them through the model's
``hf_to_vllm_mapper`` (``w13_weight``, ``w13_weight_scale``, ``w13_bias``, ...) and loads them with
``GptOssRoutedExperts.weight_loader``, its own, which takes one expert's slice under the shard ids of
vLLM's ``_GPT_OSS_STREAMED_EXPERT_SUFFIX_TO_SHARD`` (``gpt_oss_w13`` / ``gpt_oss_w2``: all of w13 at once).

Offload keeps that loader: a load fills the one-expert holder (the MXFP4 method's ``create_weights``
with one expert) through ``GptOssRoutedExperts.weight_loader``, then packs it with vLLM's CPU MXFP4
conversion; the slots hold the packed weights, their scales and both biases (quantized_experts.MXFP4).
The layout here comes from the same two vLLM tables (the mapper for the names, the shard table for the
shards). Unquantized gpt-oss (bf16 ``gate_up_proj`` ``[E, H, 2I]``) stays refused: its loader turns the
tensors in ways the unquantized per-expert path does not follow.
"""

from __future__ import annotations

from vllm_moe_offload.runtime.expert_layout import ExpertLayout, ExtraSource, ProjectionSource
from vllm_moe_offload.runtime.safetensors_io import CheckpointIndex

#: MXFP4: 32 values per scale, two values a byte
MX_BLOCK = 32


def vllm_gpt_oss_class() -> type:
    from vllm.model_executor.models.gpt_oss import GptOssRoutedExperts

    return GptOssRoutedExperts


def is_gpt_oss(cls: type) -> bool:
    """Whether ``cls`` (a vLLM ``RoutedExperts`` class) is gpt-oss's."""
    return issubclass(cls, vllm_gpt_oss_class())


def offloadable(cls: type, quant_method) -> bool:
    """Whether offload takes over a layer of ``cls`` built with ``quant_method``: gpt-oss's class with MXFP4
    experts (quantized_experts.py then checks the backend)."""
    from vllm.model_executor.layers.quantization.mxfp4 import GptOssMxfp4MoEMethod

    return cls is vllm_gpt_oss_class() and type(quant_method) is GptOssMxfp4MoEMethod


def shard_ids() -> dict[str, str]:
    """vLLM's shard id of each gpt-oss expert parameter (``w13_weight`` -> ``gpt_oss_w13``)."""
    from vllm.model_executor.models.gpt_oss import _GPT_OSS_STREAMED_EXPERT_SUFFIX_TO_SHARD

    return dict(_GPT_OSS_STREAMED_EXPERT_SUFFIX_TO_SHARD)


def layer_layout(layer, tensors: dict[str, str], params: tuple[str, ...], index: CheckpointIndex) -> ExpertLayout:
    """``layer``'s experts among ``tensors`` (vLLM name -> checkpoint name): every one of ``params`` (the
    weights, then the extras) from a stacked tensor. Each projection is whole (gate and up interleaved in w13,
    as the loader takes them), so the layout has no ``up``."""
    from vllm_moe_offload.integration.checkpoint_layout import CheckpointLayoutError

    shards = shard_ids()
    found = {}
    for vllm_name, name in tensors.items():
        param = vllm_name.removeprefix(layer.layer_name + ".")
        if param in params:
            found[param] = name
    missing = [p for p in params if p not in found]
    if missing:
        raise CheckpointLayoutError(
            f"{layer.layer_name}: no checkpoint tensor in {index.folder} fills {', '.join(missing)} of gpt-oss's "
            f"MXFP4 experts (found: {sorted(found.values())})"
        )
    num_experts = layer.global_num_experts
    for param, name in found.items():
        shape = index[name].shape
        if len(shape) < 2 or shape[0] != num_experts:
            raise CheckpointLayoutError(
                f"{layer.layer_name}: {name} is {list(shape)}, not one tensor of its {num_experts} experts [E, ...]"
            )
    w13, w2 = params[:2]
    # the weights' blocks [E, out, in/32, 16] read as [out, in/2] bytes an expert, as vLLM's loader takes them
    source = {param: ProjectionSource(name, stacked=True, flat=param in (w13, w2)) for param, name in found.items()}
    extras = tuple(ExtraSource(p, "w1" if shards[p] == shards[w13] else "w2", source[p]) for p in params[2:])
    layout = ExpertLayout(layer.layer_name, source[w13], None, source[w2], extras)
    _check_shapes(layer, index[found[w13]].shape[1:], index[found[w2]].shape[1:])
    return layout


def _check_shapes(layer, w13: tuple[int, ...], w2: tuple[int, ...]) -> None:
    """One expert's blocks: w13 ``[2I, H/32, 16]`` and w2 ``[H, I/32, 16]`` for the layer's hidden size H."""
    from vllm_moe_offload.integration.checkpoint_layout import CheckpointLayoutError

    hidden = layer.moe_config.hidden_dim_unpadded or layer.hidden_size
    half_block = MX_BLOCK // 2
    ok = (
        len(w13) == 3 and len(w2) == 3 and w13[2] == w2[2] == half_block and w13[1] * MX_BLOCK == hidden
        and w2[0] == hidden and w13[0] == 2 * w2[1] * MX_BLOCK
    )
    if not ok:
        raise CheckpointLayoutError(
            f"{layer.layer_name}: its MXFP4 expert blocks are {list(w13)} (gate_up) and {list(w2)} (down), not "
            f"[2I, {hidden // MX_BLOCK}, {half_block}] and [{hidden}, I/{MX_BLOCK}, {half_block}]"
        )


def holder_shard(shard_id: str, param: str) -> str:
    """The shard id ``GptOssRoutedExperts.weight_loader`` takes for ``param``, in place of the layout's
    ``shard_id`` (``w1`` / ``w2``): vLLM's gpt-oss table, which loads all of w13 at once."""
    return shard_ids()[param]


def own_weight_loader():
    """gpt-oss's weight_loader (unbound), the one its model's loader calls for each expert."""
    return vllm_gpt_oss_class().weight_loader
