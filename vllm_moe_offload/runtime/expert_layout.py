"""Where one expert's projections lie in a checkpoint: a tensor per expert, or one tensor for all.

Checkpoints store a MoE layer's experts in one of two ways:

* a tensor per expert and projection, ``<layer>.<e>.gate_proj.weight`` [I, H], ``up_proj`` [I, H],
  ``down_proj`` [H, I] (Mixtral, Qwen2/3-MoE, DeepSeek), sometimes gate and up in one, ``<e>.gate_up_proj``
  [2I, H];
* stacked, the expert dimension first: ``<layer>.gate_up_proj`` [E, 2I, H] and ``<layer>.down_proj``
  [E, H, I] (Gemma-4, Qwen3.5-MoE), or transposed, [E, H, 2I] and [E, I, H] (Llama-4, Qwen3-VL-MoE).

In a stacked tensor expert ``e`` is the ``e``-th of ``E`` equal contiguous byte ranges, so one expert
is still one read per tensor (``CheckpointIndex.expert_slice``); a transposed slice is turned after the
read. An :class:`ExpertLayout` names the tensors and cuts one expert's ``[w1, w3, w2]`` out of what was
read, each ``[out, in]`` as vLLM's per-expert loader takes them. Which checkpoint tensors those are is
vLLM's to say (``integration/checkpoint_layout.py``); this module knows no model's names.

A quantized checkpoint stores more per projection than its weight (FP8: ``<e>.gate_proj.weight_scale_inv``
beside ``<e>.gate_proj.weight``): those are the layout's :class:`ExtraSource` s, each named by the layer
parameter vLLM's loader fills from it (``w13_weight_scale_inv``) and its shard (``w1``), and read with the
expert's weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vllm_moe_offload.runtime.safetensors_io import CheckpointIndex, TensorLocation

#: where a per-expert name template takes the expert index
EXPERT = "{expert}"
#: the last part of a projection's weight tensor name: plain, AWQ / GPTQ, compressed-tensors pack-quantized
_WEIGHT_NAMES = ("weight", "qweight", "weight_packed")


@dataclass(frozen=True)
class ProjectionSource:
    """Where one projection (gate, up or down) of every expert of a layer lies."""

    #: stacked: the tensor's name; per expert: a template with ``{expert}`` where the index goes
    name: str
    #: one tensor holds every expert, the expert dimension first
    stacked: bool = False
    #: one expert's slice is ``[in, out]`` (``[H, 2I]`` / ``[I, H]``), turned to ``[out, in]`` after the read
    transposed: bool = False
    #: 0 / 1: the first / second half of the ``out`` rows (gate / up of a fused gate_up); None: all of them
    half: int | None = None
    #: one expert's slice ``[out, ...]`` is taken as ``[out, rest]`` (gpt-oss's MXFP4 blocks ``[out, in/32, 16]``
    #: as ``[out, in/2]`` bytes, which is how vLLM's gpt-oss loader takes them)
    flat: bool = False

    def __post_init__(self) -> None:
        if self.stacked == (EXPERT in self.name):
            raise ValueError(f"{self.name!r}: a stacked tensor's name has no {EXPERT}, a per-expert template has one")

    def tensor(self, expert_idx: int) -> str:
        """The checkpoint tensor that holds this projection of ``expert_idx``."""
        return self.name if self.stacked else self.name.replace(EXPERT, str(expert_idx))

    def location(self, index: CheckpointIndex, expert_idx: int) -> TensorLocation:
        """The bytes to read for ``expert_idx``: its slice of a stacked tensor, or its own tensor."""
        name = self.tensor(expert_idx)
        return index.expert_slice(name, expert_idx) if self.stacked else index[name]

    def cut(self, tensor: torch.Tensor) -> torch.Tensor:
        """This projection ``[out, in]`` (a view) of the tensor read for one expert."""
        if self.flat:
            tensor = tensor.reshape(tensor.shape[0], -1)
        if self.transposed:
            tensor = tensor.t()  # [in, out] -> [out, in]
        if self.half is not None:
            tensor = tensor.chunk(2, dim=0)[self.half]  # gate rows first, then up (vLLM's order)
        return tensor

    def cut_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape :meth:`cut` gives for a tensor read of ``shape``, without reading it."""
        if self.flat and len(shape) > 2:
            shape = (shape[0], math.prod(shape[1:]))
        if len(shape) != 2:
            return shape  # not an expert weight; the caller refuses it
        out, inp = (shape[1], shape[0]) if self.transposed else shape
        return (out // 2 if self.half is not None else out, inp)

    def label(self) -> str:
        """The projection's name, and how it is cut when it is not a whole tensor of its own (manifests, logs)."""
        base = self.name.rsplit(".", 1)[0] if self.name.rsplit(".", 1)[-1] in _WEIGHT_NAMES else self.name
        base = base.rsplit(".", 1)[-1]  # "w1", "gate_up_proj"
        how = [w for w, on in (("stacked", self.stacked), ("transposed", self.transposed)) if on]
        if self.half is not None:
            how.append(("first", "second")[self.half] + " half")
        return f"{base} ({', '.join(how)})" if how else base


@dataclass(frozen=True)
class ExtraSource:
    """A tensor of one projection besides its weight (a quantized checkpoint's scales), per expert."""

    param: str  # the layer parameter vLLM's loader fills from it, e.g. "w13_weight_scale_inv"
    shard_id: str  # "w1", "w3" or "w2", as vLLM's expert mapping says
    source: ProjectionSource


@dataclass(frozen=True)
class ExpertLayout:
    """One MoE layer's experts in a checkpoint."""

    prefix: str  # the layer's name (what stores key it by), e.g. "model.layers.3.block_sparse_moe.experts"
    gate: ProjectionSource  # w1
    up: ProjectionSource | None  # w3; None for non-gated experts
    down: ProjectionSource  # w2
    #: the projections' other tensors (scales of a quantized checkpoint), read with the weights
    extras: tuple[ExtraSource, ...] = ()

    @property
    def projections(self) -> list[ProjectionSource]:
        return [self.gate] + ([self.up] if self.up is not None else []) + [self.down]

    @property
    def stacked(self) -> bool:
        return any(p.stacked for p in self.projections)

    def tensor_names(self, expert_idx: int) -> list[str]:
        """The checkpoint tensors ``expert_idx`` reads from, each once (a fused gate_up serves gate and up)."""
        sources = self.projections + [x.source for x in self.extras]
        return list(dict.fromkeys(p.tensor(expert_idx) for p in sources))

    def all_tensor_names(self, num_experts: int) -> set[str]:
        """Every checkpoint tensor holding this layer's experts (what vLLM's loader must not read)."""
        return {name for e in range(num_experts) for name in self.tensor_names(e)}

    def locations(self, index: CheckpointIndex, expert_idx: int) -> list[TensorLocation]:
        """What to read for ``expert_idx``, in the order of :meth:`tensor_names`."""
        sources = self.projections + [x.source for x in self.extras]
        where = {p.tensor(expert_idx): p.location(index, expert_idx) for p in sources}
        return [where[name] for name in self.tensor_names(expert_idx)]

    def split(self, expert_idx: int, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """``[w1, w3, w2]`` (``[w1, w2]`` when not gated), each ``[out, in]``, from what :meth:`locations` read."""
        by_name = dict(zip(self.tensor_names(expert_idx), tensors))
        return [p.cut(by_name[p.tensor(expert_idx)]) for p in self.projections]

    def split_extras(self, expert_idx: int, tensors: list[torch.Tensor]) -> list[tuple[str, str, torch.Tensor]]:
        """``(param, shard_id, tensor)`` of each extra, from what :meth:`locations` read."""
        by_name = dict(zip(self.tensor_names(expert_idx), tensors))
        return [(x.param, x.shard_id, x.source.cut(by_name[x.source.tensor(expert_idx)])) for x in self.extras]

    def shapes(self, index: CheckpointIndex) -> list[tuple[int, ...]]:
        """The shapes :meth:`split` gives (expert 0), from the checkpoint's header."""
        return [p.cut_shape(p.location(index, 0).shape) for p in self.projections]

    def labels(self, expert_idx: int) -> list[str]:
        """A name for each of :meth:`split`'s tensors, for messages: the tensor, and the expert's part of it."""
        return [
            p.tensor(expert_idx) + (f"[{expert_idx}]" if p.stacked else "")
            + ("" if p.half is None else f" ({('first', 'second')[p.half]} half)")
            for p in self.projections
        ]

    def problems(self, index: CheckpointIndex, num_experts: int) -> list[str]:
        """Why experts ``0 .. num_experts - 1`` cannot be read as this layout says (empty: they can)."""
        out = []
        for name in sorted(self.all_tensor_names(num_experts)):
            if (problem := index.problem(name)) is not None:
                out.append(problem)
            elif any(p.stacked and p.name == name for p in self.projections):
                shape = index[name].shape
                if len(shape) < 3 or shape[0] != num_experts:  # MXFP4 blocks: [E, out, in/32, 16]
                    out.append(f"{name} is {list(shape)}, not one [{num_experts}, out, in] tensor of the experts")
        return out


def per_expert_layout(prefix: str, gate: str, up: str | None, down: str, suffix: str = "weight") -> ExpertLayout:
    """The layout of a tensor per expert and projection: ``<prefix>.<e>.<proj>.<suffix>``, e.g. Mixtral's
    ``model.layers.3.block_sparse_moe.experts.{e}.w1.weight``."""

    def source(proj: str) -> ProjectionSource:
        return ProjectionSource(f"{prefix}.{EXPERT}.{proj}.{suffix}")

    return ExpertLayout(prefix, source(gate), source(up) if up else None, source(down))
