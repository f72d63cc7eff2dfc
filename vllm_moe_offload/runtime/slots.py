"""The slot pool of one MoE layer: fast-memory buffers that hold resident experts.

The fused-experts kernel reads ``w13 [S, 2I', H']`` and ``w2 [S, H', I']`` and
``topk_ids`` in ``[0, S)``; :meth:`LayerSlots.remap` turns the router's expert
ids into slot ids, and :meth:`LayerSlots.ensure` makes a set of experts
resident first (loading misses through the transfer engine and waiting for
them; the wait is the stall).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch

from vllm_moe_offload.core.cache import SlotMap
from vllm_moe_offload.core.stats import LayerStats
from vllm_moe_offload.runtime.tiers import ExpertSource
from vllm_moe_offload.runtime.transfer import LinkEmulator, TransferEngine

logger = logging.getLogger("vllm.moe_offload.slots")


class ExpertLoadError(RuntimeError):
    """An expert could not be brought into its slot; the step that needed it fails."""


class LayerSlots:
    def __init__(
        self,
        layer_idx: int,
        w13_slots: torch.Tensor,  # [S, 2I', H']
        w2_slots: torch.Tensor,  # [S, H', I']
        slot_map: SlotMap,
        source: ExpertSource,
        engine: TransferEngine,
        link: LinkEmulator,
    ) -> None:
        self.layer_idx = layer_idx
        self.w13_slots = w13_slots
        self.w2_slots = w2_slots
        self.slot_map = slot_map
        self.source = source
        self.engine = engine
        self.link = link
        self.num_slots = w13_slots.shape[0]
        # expert id -> slot id, -1 when not resident. Kept on the host (decisions
        # are made there) and mirrored to the kernel's device per pass.
        self._expert_to_slot = torch.full((slot_map.num_experts,), -1, dtype=torch.int32)
        self._device_table: torch.Tensor | None = None
        self.stats = LayerStats(
            layer_idx=layer_idx,
            num_slots=self.num_slots,
            slot_bytes=w13_slots.nbytes + w2_slots.nbytes,
        )

    def warm(self) -> None:
        """Load the policy's warm set (everything when every expert has a slot)."""
        experts = self.slot_map.policy.warm_set()[: self.num_slots]
        if experts:
            self._load_missing(experts, pinned=set(experts))

    def ensure(self, experts: Sequence[int]) -> None:
        """Make ``experts`` (distinct, at most ``num_slots``) resident; count hits and misses."""
        if len(experts) > self.num_slots:
            raise ValueError(f"{len(experts)} experts requested at once but layer has {self.num_slots} slots")
        pinned = set(experts)
        missing = []
        for expert in experts:
            if self.slot_map.slot_of(expert) is None:
                missing.append(expert)
            else:
                self.slot_map.touch(expert, hit=True)
        self.stats.hits += len(experts) - len(missing)
        self.stats.misses += len(missing)
        self.stats.passes += 1
        if missing:
            self._load_missing(missing, pinned)
            for expert in missing:
                self.slot_map.touch(expert, hit=False)

    def _load_missing(self, experts: Sequence[int], pinned: set[int]) -> None:
        jobs = []
        for expert in experts:
            admission = self.slot_map.admit(expert, pinned)
            if admission.evicted is not None:
                self._expert_to_slot[admission.evicted] = -1
            jobs.append((expert, admission.slot, self.engine.submit(self._load, expert, admission.slot)))
        started = time.perf_counter()
        failures = []
        for expert, slot, job in jobs:
            try:
                num_bytes = job.result()
            except Exception as exc:  # noqa: BLE001 - reported below, slot released
                failures.append((expert, exc))
                self.slot_map.drop(expert)
                continue
            self._expert_to_slot[expert] = slot
            self.stats.add_read(self.source.tier.value, num_bytes)
            self.stats.loads += 1
        self.stats.stall_s += time.perf_counter() - started
        self._device_table = None
        self.stats.resident = len(self.slot_map)
        if failures:
            expert, exc = failures[0]
            raise ExpertLoadError(
                f"layer {self.layer_idx}: loading expert {expert} from the {self.source.tier.value} tier "
                f"failed: {exc}"
            ) from exc

    def _load(self, expert: int, slot: int) -> int:
        """Runs on an I/O thread: fetch one expert and copy it into its slot."""
        started = time.perf_counter()
        got = self.source.fetch(expert)
        self.link.pace(got.bytes_read, started)
        # [2I', H'] -> slot row; non_blocking only matters for pinned host -> GPU
        self.w13_slots[slot].copy_(got.w13, non_blocking=True)
        self.w2_slots[slot].copy_(got.w2, non_blocking=True)
        if self.w13_slots.is_cuda:
            torch.cuda.current_stream(self.w13_slots.device).synchronize()
        return got.bytes_read

    def remap(self, topk_ids: torch.Tensor) -> torch.Tensor:
        """Router expert ids [T, k] -> slot ids [T, k], same dtype and device."""
        if self._device_table is None:
            self._device_table = self._expert_to_slot.to(topk_ids.device)
        return self._device_table[topk_ids.long()].to(topk_ids.dtype)

    def end_step(self) -> None:
        """Release what the policy does not keep across steps (Load-on-Demand)."""
        self.stats.steps += 1
        dropped = self.slot_map.end_step()
        if dropped:
            self._expert_to_slot[dropped] = -1
            self._device_table = None
        self.stats.resident = len(self.slot_map)
