"""Every MoE layer class vLLM builds: offloaded, or refused at start-up naming the class and the model.

vLLM instantiates a MoE layer's experts through ``PluggableLayer``, which looks
the out-of-tree replacement up by the class's own name. ``RoutedExperts`` is
replaced by ``OffloadRoutedExperts`` (``experts.register``), but models that
build a subclass of their own (``GptOssRoutedExperts``, ``DbrxExperts``, the
Transformers backend's ``TransformersRoutedExperts``) would get the stock class:
not offloaded, while the loader still skips the experts' tensors.

So before a worker builds the model, :func:`register_model_classes` imports the
model's module (vLLM's own class resolution) and registers, for every
``RoutedExperts`` subclass then known, an offloaded subclass under its name.
That class offloads when the vLLM class changes nothing the offload path
relies on (:func:`refusal`), and refuses at construction otherwise, before any
expert memory is allocated. :func:`refuse_unoffloaded` is the backstop once the
model is built: any MoE layer that is not offloaded stops the start-up.
"""

from __future__ import annotations

import inspect
import logging

import torch
from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts

from vllm_moe_offload.integration.experts import OffloadRoutedExperts

logger = logging.getLogger("vllm.moe_offload.layer_classes")

#: what a subclass may define and still be offloaded: ``__init__`` (its own
#: attributes; the weights come from the quant method, which offload wraps) and
#: ``get_expert_mapping`` (its checkpoint names: offload reads them from it,
#: ``checkpoint_layout.py``). Anything else, a ``weight_loader`` with its own
#: checkpoint layout (DBRX, gpt-oss), its own ``load_weights`` or forward,
#: changes what offload's per-expert reads and remapped kernel calls assume.
OFFLOADABLE_OVERRIDES = frozenset({"__init__", "get_expert_mapping"})


def refusal(vllm_cls: type) -> str | None:
    """Why offload cannot take over layers of ``vllm_cls`` (a ``RoutedExperts`` subclass); None if it can."""
    own = set()
    for klass in vllm_cls.__mro__:
        if klass is RoutedExperts or not issubclass(klass, RoutedExperts):
            break
        if not issubclass(klass, OffloadRoutedExperts):
            own |= {name for name, value in vars(klass).items() if _is_method(value) and name != "__init_subclass__"}
    extra = own - OFFLOADABLE_OVERRIDES
    if not extra:
        return None
    overrides = sorted(name for name in extra if hasattr(RoutedExperts, name))
    added = sorted(extra - set(overrides))
    what = " and ".join(filter(None, [
        f"overrides {', '.join(overrides)}" if overrides else "", f"adds {', '.join(added)}" if added else "",
    ]))
    return (
        f"{what}: offload loads each expert as RoutedExperts does and runs RoutedExperts' forward, so it takes "
        f"over only subclasses that change nothing but {' and '.join(sorted(OFFLOADABLE_OVERRIDES))}"
    )


def _is_method(value) -> bool:
    return inspect.isfunction(value) or isinstance(value, (staticmethod, classmethod, property))


def vllm_class(layer: torch.nn.Module) -> type:
    """The vLLM class a (possibly offloaded) MoE layer stands for: the first ``RoutedExperts`` class of its MRO
    that is not offload's (offload's mixins, e.g. ``passes.PassSchedule``, come before it and are skipped)."""
    return next(k for k in type(layer).__mro__
                if issubclass(k, RoutedExperts) and not issubclass(k, OffloadRoutedExperts))


def register_model_classes(vllm_config) -> list[str]:
    """Register an offloaded class for every vLLM ``RoutedExperts`` subclass the model may build.

    Imports the model's own module first (through vLLM's class resolution,
    which the model loader repeats from its cache). Returns the class names
    registered now. Idempotent.
    """
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.utils import get_model_architecture

    with set_current_vllm_config(vllm_config):
        get_model_architecture(vllm_config.model_config)
    return [cls.__name__ for cls in _subclasses(RoutedExperts) if _register(cls)]


def _subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        if not issubclass(sub, OffloadRoutedExperts):
            out.append(sub)
        out.extend(_subclasses(sub))
    return list(dict.fromkeys(out))


def _register(cls: type) -> bool:
    from vllm.model_executor.custom_op import op_registry_oot

    existing = op_registry_oot.get(cls.__name__)
    if existing is not None:
        if not issubclass(existing, cls):  # another class of that name: refuse_unoffloaded will name it
            logger.warning("MoE offload: %s.%s shares its name with %s; its layers cannot be offloaded",
                           cls.__module__, cls.__qualname__, existing.__qualname__)
        return False
    offloaded = type(f"Offload{cls.__name__}", (OffloadRoutedExperts, cls), {
        "__module__": __name__,
        "__doc__": f"{cls.__qualname__} with MoE offload (see integration/layer_classes.py).",
    })
    cls.register_oot(offloaded, name=cls.__name__)
    return True


def unoffloaded_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's MoE layers (``RoutedExperts`` of any class) that offload does not hold."""
    return [
        m for m in model.modules()
        if isinstance(m, RoutedExperts) and not (isinstance(m, OffloadRoutedExperts) and m.offload_enabled)
    ]


def refuse_class(layer: torch.nn.Module, prefix: str, quant_method=None) -> None:
    """Raise ``NotImplementedError`` while ``layer`` is built when its vLLM class cannot be offloaded.

    gpt-oss's class loads its own way, which offload drives itself when the experts are MXFP4
    (``integration/gpt_oss.py``)."""
    from vllm_moe_offload.integration import gpt_oss

    cls = vllm_class(layer)
    reason = refusal(cls)
    if reason is not None and gpt_oss.offloadable(cls, quant_method):
        return
    if reason is not None and gpt_oss.is_gpt_oss(cls):
        reason += "; gpt-oss itself is offloaded with its MXFP4 experts only (quant_method 'mxfp4')"
    if reason is not None:
        from vllm.config import get_current_vllm_config_or_none

        vllm_config = get_current_vllm_config_or_none()
        model = vllm_config.model_config.model if vllm_config is not None else "this model"
        raise NotImplementedError(refusal_message(cls, model, prefix, reason))


def refuse_unoffloaded(model: torch.nn.Module, model_name: str) -> None:
    """Raise ``NotImplementedError`` naming the class and the model when a MoE layer is not offloaded."""
    layers = unoffloaded_layers(model)
    if not layers:
        return
    cls = vllm_class(layers[0])
    reason = refusal(cls) or "was built before the plugin could register an offloaded class for it"
    raise NotImplementedError(refusal_message(cls, model_name, layers[0].layer_name, reason, len(layers)))


def refusal_message(cls: type, model_name: str, layer_name: str, reason: str, num_layers: int = 1) -> str:
    more = f" (and {num_layers - 1} more MoE layers)" if num_layers > 1 else ""
    return (
        f"MoE offload cannot offload {model_name}: vLLM builds its MoE layer {layer_name}{more} as "
        f"{cls.__module__}.{cls.__qualname__}, which {reason}. Run this model without --moe-offload."
    )
