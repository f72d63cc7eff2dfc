"""Slow tiers: where an expert's weights come from when it is not in a slot.

An :class:`ExpertSource` hands out one expert in the layer's kernel format.
:class:`DiskSource` reads the checkpoint's own safetensors (direct I/O) and
converts; :class:`HostSource` keeps every converted expert in host memory
(pinned when the fast tier is a GPU) as plain tensors, never Parameters.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from vllm_moe_offload.runtime.expert_layout import ExpertLayout
from vllm_moe_offload.runtime.safetensors_io import CheckpointIndex, ThreadLocalReaders

#: where a fetch may write the expert: (w13, w2, *extra) of its slot, in kernel layout on the host; None: fresh
#: tensors
Into = tuple[torch.Tensor, ...] | None
#: (w1, w3 or None, w2) in checkpoint layout, into -> (w13, w2, *extra) in kernel layout, no expert dim: ``into``
#: itself when the converter wrote there, otherwise fresh tensors. A layout with extras (a quantized
#: checkpoint's scales) also passes them, as ``extras=[(param, shard_id, tensor), ...]``.
Converter = Callable[..., tuple[torch.Tensor, ...]]
#: (name, shape, dtype) -> a reusable tensor of the running fetch (``ThreadLocalReaders.scratch``)
Scratch = Callable[[str, tuple[int, ...], torch.dtype], torch.Tensor]


def fill(into: Into, got: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """``got`` written into ``into`` (unless it is already there), or ``got`` itself without ``into``."""
    if into is None:
        return got
    for dst, src in zip(into, got):
        if src.data_ptr() != dst.data_ptr():
            dst.copy_(src)
    return into


class TierKind(str, enum.Enum):
    DISK = "disk"
    HOST = "host"
    QUANT = "quant"  # a quantized expert store on disk (runtime/quant_source.py)
    KERNEL = "kernel"  # a store of experts in kernel layout on disk (runtime/kernel_source.py)


@dataclass(frozen=True)
class ExpertTensors:
    w13: torch.Tensor  # [2I', H'] kernel layout
    w2: torch.Tensor  # [H', I'] kernel layout
    bytes_read: int  # bytes that crossed the slow tier for this fetch
    #: the kernel's other per-expert tensors, in the order of the layer's slot pools (FP8: the block scales)
    extra: tuple[torch.Tensor, ...] = ()

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        """``(w13, w2, *extra)``: what a slot holds."""
        return (self.w13, self.w2, *self.extra)


class ExpertSource(Protocol):
    tier: TierKind

    def fetch(self, expert_idx: int, into: Into = None) -> ExpertTensors:
        """Expert ``expert_idx`` in kernel layout, written into ``into`` when given (then its tensors)."""
        ...

    def close(self) -> None: ...


class DiskSource:
    """Experts read from the checkpoint's safetensors on every fetch.

    ``layout`` says which tensors hold an expert: its own tensors, or its slice of
    tensors stacking every expert (one contiguous read each, transposed after the
    read where the checkpoint stores ``[in, out]``).
    """

    tier = TierKind.DISK

    def __init__(
        self, index: CheckpointIndex, layout: ExpertLayout, convert: Converter, readers: ThreadLocalReaders,
        num_experts: int = 1,
    ) -> None:
        self.index = index
        self.layout = layout
        self.convert = convert
        self.readers = readers
        missing = [n for n in layout.tensor_names(0) if n not in index]
        if missing:
            raise KeyError(
                f"expert tensors {missing} are not in the checkpoint at {index.folder}; "
                "this checkpoint's expert naming is not supported by vllm-moe-offload"
            )
        # every expert checked at start-up: a broken checkpoint fails here, not in a request
        problems = layout.problems(index, num_experts)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise ValueError(f"the checkpoint at {index.folder} cannot be offloaded: {problems[0]}{more}")

    def fetch(self, expert_idx: int, into: Into = None) -> ExpertTensors:
        locs = self.layout.locations(self.index, expert_idx)
        with self.readers.fetching(f"expert {expert_idx} of {self.layout.prefix}") as reader:
            before = reader.bytes_read

            def convert(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
                for path in {loc.path for loc in locs}:  # bytes of a file changed since start-up are never used
                    self.index.check_unchanged(path, reader.stat(path))
                w = self.layout.split(expert_idx, tensors)  # [w1, w3, w2] or [w1, w2], each [out, in]
                w3 = w[1] if len(w) == 3 else None
                if self.layout.extras:  # a quantized checkpoint: the projections' scales too
                    extras = self.layout.split_extras(expert_idx, tensors)
                    return fill(into, self.convert(w[0], w3, w[-1], into, extras=extras))
                return fill(into, self.convert(w[0], w3, w[-1], into))

            # converted straight out of the read buffer: what comes back is fresh, or ``into``
            w13, w2k, *extra = reader.read_then(locs, convert)
            return ExpertTensors(w13, w2k, reader.bytes_read - before, tuple(extra))

    def close(self) -> None:
        pass


class HostSource:
    """Every expert of a layer kept converted in host memory."""

    tier = TierKind.HOST

    def __init__(self, origin: ExpertSource, num_experts: int, pin: bool) -> None:
        self._experts: list[tuple[torch.Tensor, ...]] = []  # (w13, w2, *extra) of each expert
        for expert_idx in range(num_experts):
            got = tuple(t.cpu() for t in origin.fetch(expert_idx).tensors)
            self._experts.append(tuple(t.pin_memory() for t in got) if pin else got)

    @property
    def num_bytes(self) -> int:
        return sum(t.nbytes for expert in self._experts for t in expert)

    def fetch(self, expert_idx: int, into: Into = None) -> ExpertTensors:
        w13, w2, *extra = fill(into, self._experts[expert_idx])
        return ExpertTensors(w13, w2, sum(t.nbytes for t in (w13, w2, *extra)), tuple(extra))

    def close(self) -> None:
        self._experts.clear()
