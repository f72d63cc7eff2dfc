"""Which checkpoint tensors hold each offloaded layer's experts: vLLM's own expert mapping, applied to the header.

vLLM loads a MoE layer's experts in ``RoutedExperts.load_weights``: the model's
``hf_to_vllm_mapper`` renames each checkpoint tensor, and the layer's
``get_expert_mapping(include_fused=True)`` says which tensor fills which
projection (``shard_id`` w1 / w3 / w2) of which expert. A tensor may hold one
projection of one expert (``experts.<e>.gate_proj.``), gate and up of one expert
(``experts.<e>.gate_up_proj.``, split in halves), or one projection of every
expert (``experts.gate_up_proj`` / ``experts.down_proj``, the expert dimension
first). :func:`expert_layouts` matches the checkpoint's tensor names against
that mapping as ``load_weights`` does, reading no tensor, and gives each layer
its :class:`ExpertLayout`; the loader skips exactly those tensors
(``patches/weight_utils.py``) and the disk tier reads them one expert at a time.

Stacked tensors are ``[E, 2I, H]`` / ``[E, H, I]`` or transposed ``[E, H, 2I]`` /
``[E, I, H]``. vLLM transposes where the layer says ``is_fused_checkpoint_transposed``
(Qwen3-VL-MoE) and where the model's own loader does (Llama-4's, which leaves
that flag unset), so the orientation is read from the shapes against the
layer's hidden size; the flag decides only where the shapes cannot (square).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import replace

import torch

from vllm_moe_offload.core.config import format_bytes
from vllm_moe_offload.integration.quantized_experts import checkpoint_param_names
from vllm_moe_offload.runtime.expert_layout import EXPERT, ExpertLayout, ExtraSource, ProjectionSource
from vllm_moe_offload.runtime.safetensors_io import CheckpointIndex

logger = logging.getLogger("vllm.moe_offload.checkpoint_layout")

#: the layer parameters that hold expert weights; a quantized layer's scales are its extras (quantized_experts.py)
_WEIGHTS = ("w13_weight", "w2_weight")


class CheckpointLayoutError(ValueError):
    """The checkpoint's expert tensors are not what vLLM's expert mapping says they are."""


def offloaded_expert_tensors(model: torch.nn.Module, vllm_config) -> set[str]:
    """The checkpoint tensors of every offloaded expert: what vLLM's loader must not read.

    Refuses first a model with MoE layers offload does not hold (``layer_classes``).
    """
    from vllm_moe_offload.integration.experts import offloaded_layers
    from vllm_moe_offload.integration.layer_classes import refuse_unoffloaded

    refuse_unoffloaded(model, vllm_config.model_config.model)
    layers = offloaded_layers(model)
    if not layers:
        return set()
    index = CheckpointIndex(checkpoint_folder(vllm_config))
    layouts = expert_layouts(model, layers, index)
    names = {n for layer in layers for n in layouts[layer.layer_name].all_tensor_names(layer.global_num_experts)}
    first = layouts[layers[0].layer_name]
    logger.info(
        "MoE offload: vLLM's loader skips %d checkpoint tensors (%s) holding the experts of %d MoE layers, "
        "each %s; the plugin reads them one expert at a time", len(names),
        format_bytes(sum(index[n].num_bytes for n in names)), len(layers),
        "stacked in one tensor per projection" if first.stacked else "a tensor per expert and projection",
    )
    scales = sorted({x.source.name.rsplit(".", 1)[-1] for x in first.extras})  # "weight_scale_inv"
    with_scales = f", each with its {', '.join(scales)}" if scales else ""
    logger.info("MoE offload: layer %s reads its experts from %s%s", first.prefix,
                ", ".join(p.label() for p in first.projections), with_scales)
    return names


def checkpoint_folder(vllm_config) -> str:
    """The local folder of the model's safetensors (a hub model's from the local cache vLLM downloaded to)."""
    model = vllm_config.model_config.model
    if os.path.isdir(model):
        return model
    from huggingface_hub import snapshot_download

    return snapshot_download(
        model, revision=vllm_config.model_config.revision, allow_patterns=["*.safetensors"],
        cache_dir=vllm_config.load_config.download_dir, local_files_only=True,
    )


def expert_layouts(model: torch.nn.Module, layers: Iterable, index: CheckpointIndex) -> dict[str, ExpertLayout]:
    """Each offloaded layer's :class:`ExpertLayout`, by layer name."""
    layers = list(layers)
    mapper = getattr(model, "hf_to_vllm_mapper", None)
    owned: dict[str, dict[str, str]] = {layer.layer_name: {} for layer in layers}  # vLLM name -> checkpoint name
    for name in index.names():
        vllm_name = mapper.map_name(name) if mapper is not None else name
        owner = _owner(vllm_name, owned) if vllm_name is not None else None
        if owner is not None:
            owned[owner][vllm_name] = name
    return {layer.layer_name: layer_layout(layer, owned[layer.layer_name], index) for layer in layers}


def _owner(vllm_name: str, owned: dict) -> str | None:
    """The layer whose name prefixes ``vllm_name`` (as ``AutoWeightsLoader`` routes it), if any."""
    head = vllm_name
    while "." in head:
        head = head.rsplit(".", 1)[0]
        if head in owned:
            return head
    return None


def layer_layout(layer, tensors: dict[str, str], index: CheckpointIndex) -> ExpertLayout:
    """``layer``'s experts among ``tensors`` (its checkpoint tensors: vLLM name -> checkpoint name)."""
    where = {"w1": {}, "w3": {}, "w2": {}}  # shard -> {expert (None: stacked): (checkpoint name, vLLM name, half)}
    params = checkpoint_param_names(layer)  # w13_weight / w2_weight (AWQ: w13_qweight / w2_qweight), extras
    fmt = getattr(layer, "expert_format", None)
    if fmt is not None and fmt.own_loader:  # gpt-oss: the model's own names and shards (gpt_oss.py)
        from vllm_moe_offload.integration import gpt_oss

        return gpt_oss.layer_layout(layer, tensors, params, index)
    weights, extra_params = params[:2], params[2:]
    extra: dict[tuple[str, str], dict] = {}  # (param, shard) -> as ``where``'s values
    mapping = layer.get_expert_mapping(include_fused=True)
    gated = layer.moe_config.is_act_and_mul
    for vllm_name, name in sorted(tensors.items()):
        for param, shard_id, expert_id, half, stacked in _matches(
            layer.layer_name, vllm_name, index[name], mapping, gated, params,
        ):
            found = where[shard_id] if param in weights else extra.setdefault((param, shard_id), {})
            found[None if stacked else expert_id] = (name, vllm_name, half)
    num_experts = layer.global_num_experts
    if not where["w1"] or not where["w2"] or (gated and not where["w3"]):
        example = next((w for _, w, _, _ in mapping if w.count(".") > 1), mapping[0][1])
        raise CheckpointLayoutError(
            f"{layer.layer_name}: vLLM's expert mapping for this layer (tensors like {layer.layer_name}."
            f"{example.removeprefix('experts.')}...) matches no complete set of expert weights in the checkpoint at "
            f"{index.folder} (found: {sorted({n for s in where.values() for n, _, _ in s.values()})[:6]})"
        )
    sources = {
        shard: _source(layer.layer_name, shard, found, num_experts, index) for shard, found in where.items() if found
    }
    sources = _oriented(layer, sources, index)
    layout = ExpertLayout(layer.layer_name, sources["w1"], sources.get("w3"), sources["w2"],
                          _extras(layer, extra_params, extra, index))
    _check_shapes(layer, layout, index)
    return layout


def _extras(layer, params: tuple[str, ...], found: dict, index: CheckpointIndex) -> tuple[ExtraSource, ...]:
    """The sources of a quantized layer's per-expert tensors besides the weights (its scales), all required."""
    num_experts = layer.global_num_experts
    shards = ("w1", "w3", "w2") if layer.moe_config.is_act_and_mul else ("w1", "w2")
    out = []
    for param in params:
        for shard in [s for s in shards if (s == "w2") == param.startswith("w2_")]:
            if not found.get((param, shard)):
                raise CheckpointLayoutError(
                    f"{layer.layer_name}: no checkpoint tensor fills {param} ({shard}) of its experts in "
                    f"{index.folder}; a {layer.expert_format.name} layer needs one per expert"
                )
            source = _source(layer.layer_name, shard, found[(param, shard)], num_experts, index)
            if source.stacked:
                raise CheckpointLayoutError(
                    f"{layer.layer_name}: {source.name} stacks every expert's {param}; offload reads quantized "
                    "experts stored per expert only"
                )
            out.append(ExtraSource(param, shard, source))
    return tuple(out)


def _matches(layer_name: str, vllm_name: str, loc, mapping, gated: bool, params: tuple[str, ...] = _WEIGHTS):
    """(param, shard_id, expert_id, half, stacked) for each expert tensor in ``params`` ``load_weights`` would fill
    from this tensor."""
    expert_key = vllm_name.removeprefix(layer_name + ".").partition(".")[0]
    named = expert_key.isdecimal()
    stacked = not named and len(loc.shape) == 3  # vLLM: a 3-D tensor without an expert index holds every expert
    matched = False
    for param_name, weight_name, expert_id, shard_id in mapping:
        if weight_name not in vllm_name:
            if matched and stacked:
                break  # stacked tensors take the first run of matching entries, as in load_weights
            continue
        if named and weight_name.removeprefix("experts.").partition(".")[0] != expert_key:
            continue
        matched = True
        param = vllm_name.replace(weight_name, param_name).removeprefix(layer_name + ".")
        if param not in params:
            continue
        if stacked:
            # the mapping's expert_id is the chunk of a stacked gate_up (0: gate, 1: up)
            yield param, shard_id, None, expert_id if shard_id in ("w1", "w3") and gated else None, True
        else:
            fused_w13 = shard_id in ("w1", "w3") and any(f".{f}." in vllm_name for f in ("gate_up_proj", "w13"))
            yield param, shard_id, expert_id, ({"w1": 0, "w3": 1}[shard_id] if fused_w13 else None), False


def _source(layer_name: str, shard: str, found: dict, num_experts: int, index: CheckpointIndex) -> ProjectionSource:
    """One projection's :class:`ProjectionSource`: a stacked tensor, or a per-expert name template."""
    if None in found:
        if len(found) > 1:
            raise CheckpointLayoutError(f"{layer_name}: projection {shard} is both stacked and stored per expert")
        name, _, half = found[None]
        return ProjectionSource(name, stacked=True, half=half)
    templates = {_template(layer_name, e, name, vllm_name) for e, (name, vllm_name, _) in found.items()}
    halves = {half for _, _, half in found.values()}
    if len(templates) != 1 or None in templates or len(halves) != 1:
        raise CheckpointLayoutError(f"{layer_name}: the {shard} tensors of its experts follow no one naming pattern")
    source = ProjectionSource(templates.pop(), half=halves.pop())
    missing = sorted(set(range(num_experts)) - set(found))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointLayoutError(
            f"the checkpoint at {index.folder} cannot be offloaded: {source.tensor(missing[0])} is missing{more}"
        )
    return source


def _template(layer_name: str, expert_idx: int, name: str, vllm_name: str) -> str | None:
    """``name`` with ``{expert}`` where the expert index is (the index follows the layer's name in vLLM's)."""
    tail = vllm_name.removeprefix(layer_name + ".")  # "<e>.gate_proj.weight"
    if "{" in name or not name.endswith("." + tail):
        return None
    return name[: len(name) - len(tail)] + EXPERT + tail[len(str(expert_idx)):]


def _oriented(layer, sources: dict[str, ProjectionSource], index: CheckpointIndex) -> dict[str, ProjectionSource]:
    """Stacked sources marked transposed where the checkpoint stores ``[E, in, out]``."""
    stacked = {shard: s for shard, s in sources.items() if s.stacked}
    if not stacked:
        return sources
    hidden = layer.moe_config.hidden_dim_unpadded or layer.hidden_size
    fits = {False, True}
    for shard, source in stacked.items():
        out, inp = index[source.name].shape[1:]  # as stored
        # w1 / w3 take the hidden size as input, w2 gives it as output
        plain, turned = (inp == hidden, out == hidden) if shard != "w2" else (out == hidden, inp == hidden)
        fits &= {t for t, ok in ((False, plain), (True, turned)) if ok}
    if not fits:
        shapes = {index[s.name].shape for s in stacked.values()}
        raise CheckpointLayoutError(
            f"{layer.layer_name}: stacked expert tensors {sorted(shapes)} fit neither [E, out, in] nor [E, in, out] "
            f"for hidden size {hidden}"
        )
    transposed = fits.pop() if len(fits) == 1 else layer.is_fused_checkpoint_transposed
    return {shard: replace(s, transposed=transposed) if s.stacked else s for shard, s in sources.items()}


def _check_shapes(layer, layout: ExpertLayout, index: CheckpointIndex) -> None:
    """Gate and up must read as ``[I, H]`` and down as ``[H, I]``: what vLLM's per-expert loader takes
    (a packed format's stored ``[in, out/8]`` read as its ``[out, in]``)."""
    fmt = getattr(layer, "expert_format", None)
    shapes = [fmt.logical_shape(s) for s in layout.shapes(index)] if fmt is not None else layout.shapes(index)
    gate, down = shapes[0], shapes[-1]
    hidden = layer.moe_config.hidden_dim_unpadded or layer.hidden_size
    if any(len(s) != 2 for s in shapes) or any(s != gate for s in shapes[:-1]) or down != gate[::-1] or (
        gate[1] != hidden
    ):
        raise CheckpointLayoutError(
            f"{layer.layer_name}: its experts' projections read as {[list(s) for s in shapes]} from "
            f"{layout.labels(0)}, not gate and up [I, {hidden}] and down [{hidden}, I]"
        )
