"""The slot pool of one MoE layer: fast-memory buffers that hold resident experts.

The fused-experts kernel reads ``w13 [S, 2I', H']`` and ``w2 [S, H', I']`` and
``topk_ids`` in ``[0, S)``; :meth:`LayerSlots.remap` turns the router's expert
ids into slot ids, and :meth:`LayerSlots.ensure` makes a set of experts
resident first (loading misses through the transfer engine and waiting for
them; the wait is the stall). :meth:`LayerSlots.prefetch` starts loads without
waiting, while an earlier layer computes; the next :meth:`ensure` of this layer
waits for whatever is still in flight before it touches any slot, so a slot is
never read while a load writes it, and never evicted while a load is pending.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import Future

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
        self._pending: dict[int, tuple[int, Future]] = {}  # expert -> (slot, load) started by prefetch
        self._prefetched: set[int] = set()  # resident by prefetch, not needed since
        self._predicted: set[int] | None = None  # the last prediction for this layer's next step
        self._identity: bool | None = None  # decided once, after warm()
        #: seconds one expert load took, smoothed (for the over-fetch depth)
        self.load_s_ema: float | None = None
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

    @property
    def fully_resident(self) -> bool:
        return self.num_slots >= self.slot_map.num_experts

    @property
    def identity(self) -> bool:
        """Every expert is resident in the slot of its own id, for good (budget 100%).

        Then the kernel can take the router's ids as they are; no step counts
        hits or misses because none is looked up.
        """
        if self._identity is None:
            experts = range(self.slot_map.num_experts)
            self._identity = (
                self.fully_resident
                and all(self.slot_map.slot_of(e) == e for e in experts)
                and all(self.slot_map.policy.keep_after_step(e) for e in experts)
            )
        return self._identity

    def prefetch(self, experts: Sequence[int]) -> None:
        """Start loading ``experts`` (most wanted first) without waiting; also the prediction to score.

        At most ``num_slots`` are kept; experts already resident or in flight cost nothing.
        """
        self._collect_finished()
        self.stats.prefetch_unused += len(self._prefetched)
        self._prefetched.clear()
        wanted = list(dict.fromkeys(experts))[: self.num_slots]
        self._predicted = set(wanted)
        pinned = set(wanted) | set(self._pending)
        for expert in wanted:
            if self.slot_map.slot_of(expert) is not None:
                continue
            try:
                admission = self.slot_map.admit(expert, pinned)
            except RuntimeError:
                break  # every slot holds a wanted expert or a load in flight
            if admission.evicted is not None:
                self._forget(admission.evicted)
            self._pending[expert] = (admission.slot, self.engine.submit(self._load, expert, admission.slot))
            self.slot_map.touch(expert, hit=False)
            self.stats.prefetch_loads += 1

    def ensure(self, experts: Sequence[int]) -> None:
        """Make ``experts`` (distinct, at most ``num_slots``) resident; count hits and misses."""
        if len(experts) > self.num_slots:
            raise ValueError(f"{len(experts)} experts requested at once but layer has {self.num_slots} slots")
        self._finish_pending()
        self._score_prediction(experts)
        pinned = set(experts)
        missing = []
        for expert in experts:
            if self.slot_map.slot_of(expert) is None:
                missing.append(expert)
                continue
            self.slot_map.touch(expert, hit=True)
            if expert in self._prefetched:
                self._prefetched.discard(expert)
                self.stats.prefetch_hits += 1
            else:
                self.stats.hits += 1
        self.stats.misses += len(missing)
        self.stats.passes += 1
        if missing:
            self._load_missing(missing, pinned)
            for expert in missing:
                self.slot_map.touch(expert, hit=False)

    def _score_prediction(self, experts: Sequence[int]) -> None:
        if self._predicted is None:
            return
        needed = set(experts)
        self.stats.predicted += len(self._predicted)
        self.stats.predicted_right += len(self._predicted & needed)
        self.stats.needed_when_predicted += len(needed)
        self._predicted = None  # later passes of the same step are not predictions

    def _finish_pending(self) -> None:
        """Wait for prefetches in flight (the wait is stall) and map what arrived."""
        if not self._pending:
            return
        started = time.perf_counter()
        for expert, (slot, job) in list(self._pending.items()):
            self._finish(expert, slot, job)
        self.stats.stall_s += time.perf_counter() - started

    def _collect_finished(self) -> None:
        for expert, (slot, job) in list(self._pending.items()):
            if job.done():
                self._finish(expert, slot, job)

    def _finish(self, expert: int, slot: int, job: Future) -> None:
        del self._pending[expert]
        try:
            num_bytes = job.result()
        except Exception:  # noqa: BLE001 - a failed prefetch is only a lost guess
            logger.warning("layer %d: prefetch of expert %d failed; it will be loaded on demand",
                           self.layer_idx, expert, exc_info=True)
            self.slot_map.drop(expert)
            return
        self._expert_to_slot[expert] = slot
        self._device_table = None
        self._prefetched.add(expert)
        self._account(num_bytes)

    def _forget(self, expert: int) -> None:
        self._expert_to_slot[expert] = -1
        if expert in self._prefetched:
            self._prefetched.discard(expert)
            self.stats.prefetch_unused += 1  # loaded ahead, evicted before any use
        self._device_table = None

    def _account(self, num_bytes: int) -> None:
        self.stats.add_read(self.source.tier.value, num_bytes)
        self.stats.loads += 1

    def _load_missing(self, experts: Sequence[int], pinned: set[int]) -> None:
        jobs = []
        for expert in experts:
            admission = self.slot_map.admit(expert, pinned)
            if admission.evicted is not None:
                self._forget(admission.evicted)
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
            self._account(num_bytes)
        self.stats.stall_s += time.perf_counter() - started
        self._device_table = None
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
        took_s = time.perf_counter() - started
        self.load_s_ema = took_s if self.load_s_ema is None else 0.9 * self.load_s_ema + 0.1 * took_s
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
        self._finish_pending()  # nothing in flight may be dropped under a load
        for expert in self.slot_map.end_step():
            self._forget(expert)

    def stats_dict(self) -> dict:
        """The layer's counters, with the slots in use now."""
        self.stats.resident = len(self.slot_map)
        return self.stats.to_dict()
