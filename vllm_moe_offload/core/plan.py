"""How many expert slots each offloaded layer gets from the budget."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from vllm_moe_offload.core.config import Budget, OffloadConfigError, format_bytes

#: O_DIRECT needs offsets, lengths and buffer addresses aligned to the logical block size;
#: 4 KiB covers every disk and filesystem we run on (the read buffers are rounded to it)
READ_ALIGN_BYTES = 4096
#: a transparent huge page on x86-64; a read buffer of at least one is a whole number of them
#: (``runtime/safetensors_io.py`` ``ReadBuffers``: direct reads land faster in huge pages)
HUGE_PAGE_BYTES = 2 * 2**20
#: byte alignment of each tensor inside a CUDA staging buffer: any dtype's view is aligned,
#: and 256 bytes matches CUDA's allocation granularity for coalesced DMA reads
STAGING_ALIGN_BYTES = 256


def round_up(num_bytes: int, align: int) -> int:
    return -(-num_bytes // align) * align


def read_buffer_bytes(read_span_bytes: int) -> int:
    """Size of the aligned buffer one read of ``read_span_bytes`` needs (as ``TensorReader`` allocates it).

    The span is widened to whole blocks at both ends: at most one block more
    than the span rounded up; from one huge page on, whole huge pages.
    """
    return buffer_bytes(round_up(read_span_bytes, READ_ALIGN_BYTES) + READ_ALIGN_BYTES)


def buffer_bytes(num_bytes: int) -> int:
    """The size of a read buffer for reads of up to ``num_bytes``: whole huge pages from one on."""
    return round_up(num_bytes, HUGE_PAGE_BYTES) if num_bytes >= HUGE_PAGE_BYTES else num_bytes


def ring_buffer_bytes(expert_bytes: int) -> int:
    """One CUDA staging buffer: an expert's tensors, each starting aligned (as ``StagingRing`` allocates it)."""
    return round_up(expert_bytes, STAGING_ALIGN_BYTES) + STAGING_ALIGN_BYTES


@dataclass(frozen=True)
class Staging:
    """Memory the expert loads need besides the slots; it comes out of the budget too.

    Each I/O thread has one read buffer (the largest read span, block-aligned)
    and converts one expert at a time, whose temporaries are the read tensors
    (one span) plus two experts in kernel layout (the loader's buffers and the
    converted result). On CUDA, the pinned staging ring holds ``io_threads + 1``
    buffers of one expert each.
    """

    io_threads: int
    read_buffer_bytes: int  # one I/O thread's read buffer
    convert_bytes: int  # one expert's conversion temporaries
    ring_bytes: int = 0  # the CUDA staging ring, all its buffers (0 off CUDA)

    @property
    def total_bytes(self) -> int:
        return self.io_threads * (self.read_buffer_bytes + self.convert_bytes) + self.ring_bytes

    def describe(self) -> str:
        ring = f" + CUDA staging ring {self.ring_bytes}" if self.ring_bytes else ""
        threads = f"{self.io_threads} I/O thread{'s' if self.io_threads > 1 else ''}"
        return f"{threads} x (read buffer {self.read_buffer_bytes} + conversion {self.convert_bytes}){ring}"


def staging_for(
    io_threads: int, expert_bytes: int, read_span_bytes: int, cuda: bool = False, convert: bool = True,
) -> Staging:
    """The staging reservation for ``io_threads`` loaders of experts of ``expert_bytes`` (kernel layout).

    ``read_span_bytes`` is the largest single read of one expert's checkpoint
    tensors (all tensor-parallel shards: the reader takes whole projections).
    The one function the user's process (from the model config) and the worker
    (from the checkpoint and the kernel layout) both plan with.

    ``convert`` False: the loads convert nothing (a kernel-layout store read
    straight into host slots); ``read_span_bytes`` is then the part of one read
    that does not land in the slot (padding, parts not aligned for direct I/O),
    and no conversion temporaries are reserved.
    """
    if io_threads < 1 or expert_bytes < 1 or read_span_bytes < (1 if convert else 0):
        raise ValueError(
            f"bad staging geometry: {io_threads} I/O threads, {expert_bytes} bytes per expert, "
            f"{read_span_bytes} bytes per read"
        )
    ring = (io_threads + 1) * ring_buffer_bytes(expert_bytes) if cuda else 0
    convert_bytes = read_span_bytes + 2 * expert_bytes if convert else 0
    return Staging(io_threads, read_buffer_bytes(read_span_bytes), convert_bytes, ring)


@dataclass(frozen=True)
class SlotPlan:
    """Slots of every MoE layer, in layer order; they and the staging never exceed ``budget_bytes``."""

    layer_slots: tuple[int, ...]
    num_experts: int
    expert_bytes: int
    budget_bytes: int
    staging: Staging | None = None

    @property
    def staging_bytes(self) -> int:
        """Bytes reserved for staging the loads (read buffers, conversion, CUDA ring)."""
        return self.staging.total_bytes if self.staging is not None else 0

    @property
    def num_layers(self) -> int:
        return len(self.layer_slots)

    @property
    def slots_per_layer(self) -> int:
        """Slots of the layers that are not fully resident (all layers when the split is even)."""
        return min(self.layer_slots)

    @property
    def resident_layers(self) -> int:
        """Leading layers given every expert while later layers offload (shallow-favoring)."""
        if self.fully_resident:
            return 0
        return next(i for i, slots in enumerate(self.layer_slots) if slots < self.num_experts)

    @property
    def slot_bytes(self) -> int:
        """Bytes held by every layer's slots together; never above ``budget_bytes``."""
        return sum(self.layer_slots) * self.expert_bytes

    @property
    def total_expert_bytes(self) -> int:
        return self.num_experts * self.num_layers * self.expert_bytes

    @property
    def fully_resident(self) -> bool:
        return all(slots >= self.num_experts for slots in self.layer_slots)


def minimum_bytes(num_layers: int, top_k: int, expert_bytes: int) -> int:
    """Smallest budget one step can run with: ``top_k`` slots in every MoE layer.

    A token needs its ``top_k`` experts resident at once, and a step visits every
    layer, so no budget below this can compute even a single token.
    """
    return num_layers * top_k * expert_bytes


def plan_slots(
    budget: Budget, num_layers: int, num_experts: int, top_k: int, expert_bytes: int, resident_layers: int = 0,
    min_rest_slots: int | None = None, staging: Staging | None = None,
    extra_order: Callable[[int], Sequence[int]] | None = None,
) -> SlotPlan:
    """Split ``budget``, less the ``staging`` reservation, over ``num_layers`` layers of ``num_experts`` experts.

    A size budget holds the staging and the slots: the staging comes out of it
    before the slots are split. A share budget is a share of the model's
    expert bytes for the slots, and the staging is added to it (``25%`` keeps
    a quarter of the experts, ``100%`` every expert). The first
    ``resident_layers`` layers get every expert (Fate's shallow-favoring split:
    shallow layers predict worst) as long as each later layer keeps at least
    ``min_rest_slots`` (default ``top_k``) slots; fewer leading layers are made
    resident otherwise. The rest is split evenly, and what an even split leaves
    (fewer slots than offloaded layers) goes one slot each to offloaded layers,
    so that no whole expert's worth of the budget stays idle: in the order
    ``extra_order(base)`` gives (layer indices, ``base`` being the offloaded
    layers' even count; e.g. those an extra slot saves most misses), else
    spread evenly over the offloaded layers from the first. A budget above the model's
    expert bytes and the staging is capped at everything resident. Raises
    :class:`OffloadConfigError` naming the minimum in bytes, and its parts, when
    the budget cannot give every layer ``top_k`` slots besides the staging.
    """
    if num_layers < 1 or num_experts < 1 or expert_bytes < 1 or not 1 <= top_k <= num_experts:
        raise ValueError(
            f"bad model geometry: {num_layers} layers, {num_experts} experts, top_k {top_k}, "
            f"{expert_bytes} bytes per expert"
        )
    total = num_layers * num_experts * expert_bytes
    staging_bytes = staging.total_bytes if staging is not None else 0
    budget_bytes = budget.resolve(total) + (staging_bytes if budget.fraction is not None else 0)
    slot_budget_bytes = max(0, budget_bytes - staging_bytes)
    even = min(num_experts, slot_budget_bytes // (num_layers * expert_bytes))
    if even < top_k:
        raise OffloadConfigError(_below_minimum(budget, budget_bytes, num_layers, num_experts, top_k, expert_bytes,
                                                staging))
    layer_slots = [even] * num_layers
    slots_total = slot_budget_bytes // expert_bytes
    for resident in range(min(resident_layers, num_layers - 1), 0, -1):
        if even >= num_experts:
            break
        rest = min(num_experts, (slots_total - resident * num_experts) // (num_layers - resident))
        if rest >= max(top_k, min_rest_slots or 0):
            layer_slots = [num_experts] * resident + [rest] * (num_layers - resident)
            break
    _give_spare_slots(layer_slots, slots_total - sum(layer_slots), num_experts, extra_order)
    return SlotPlan(tuple(layer_slots), num_experts, expert_bytes, budget_bytes, staging)


def _give_spare_slots(
    layer_slots: list[int], spare: int, num_experts: int, extra_order: Callable[[int], Sequence[int]] | None,
) -> None:
    """One more slot each for ``spare`` offloaded layers (in place); ``spare`` is below their count.

    Every offloaded layer has the same ``base`` count here (the even split of
    what resident layers leave), so an order of layers is all a preference needs.
    """
    offloaded = [i for i, n in enumerate(layer_slots) if n < num_experts]
    spare = min(spare, len(offloaded))
    if spare <= 0:
        return
    if extra_order is None:  # evenly spread, from the first offloaded layer
        order = [offloaded[i * len(offloaded) // spare] for i in range(spare)]
    else:
        allowed = set(offloaded)
        order = [i for i in dict.fromkeys(extra_order(layer_slots[offloaded[0]])) if i in allowed]
        named = set(order)
        order += [i for i in offloaded if i not in named]  # layers the order left out come last
    for layer in order[:spare]:
        layer_slots[layer] += 1


def _below_minimum(
    budget: Budget, budget_bytes: int, num_layers: int, num_experts: int, top_k: int, expert_bytes: int,
    staging: Staging | None,
) -> str:
    slots = minimum_bytes(num_layers, top_k, expert_bytes)
    total = num_layers * num_experts * expert_bytes
    staged = staging.total_bytes if staging is not None else 0
    minimum, most = slots + staged, total + staged
    parts = f"top_k={top_k} experts x {num_layers} MoE layers x {expert_bytes} bytes per expert"
    if staging is not None:
        parts = f"slots {slots} ({parts}) + staging {staged} ({staging.describe()})"
    staged_note = "" if staging is None else "; a share gets the staging on top"
    return (
        f"budget {budget} ({budget_bytes} bytes) is below the minimum one step needs: {minimum} bytes "
        f"({format_bytes(minimum)}: {parts}); allowed: {minimum} to {most} bytes "
        f"({100 * top_k / num_experts:.4g}% to 100% of expert bytes{staged_note})"
    )
