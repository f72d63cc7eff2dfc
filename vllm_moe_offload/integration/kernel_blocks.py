"""Stock's bits for a quantized layer's tokens when a step runs in several kernel calls.

vLLM's CPU kernel for quantized experts (``fused_experts_cpu``, used by ``CPUExpertsFp8`` and
``CPUExpertsInt4``) sorts a call's (token, expert) pairs by expert and computes each expert's rows in blocks
of ``BLOCK_M`` rows, in the call's token order. A block of more than ``SMALL_BLOCK`` rows runs on the AMX
path (weights dequantized to bf16, one tile GEMM), a smaller block on another path whose bits differ. Which
path a row takes is all that a row's result depends on besides its own input (measured here on random
experts; ``tests/integration/test_kernel_rows.py`` keeps checking it). So when offload splits a step into
several calls (passes: more experts than slots), a row can change path, and a token's bits change: greedy
tokens then differ from stock's on a trained model.

The remedy: before each call, dummy rows (zero input, zero weight, their output dropped) are put in front,
routed so that every real row of every expert lands in a block on the same path as in the whole step's call:

* an expert with at most ``SMALL_BLOCK`` rows in the step: all small; the call has no more, so nothing to do
  (dummies may join while the block stays small);
* an expert whose step blocks are all large: the call's last block for it must not be small:
  ``(dummies + rows) % BLOCK_M`` must not be in ``1..SMALL_BLOCK``;
* an expert whose step count leaves a small last block (more than ``BLOCK_M`` rows and a remainder of at most
  ``SMALL_BLOCK``): its last rows in token order are small in the step. In the call they come last too; the
  rows before them must fill whole blocks: ``(dummies + rows before) % BLOCK_M == 0``.

A dummy row carries ``top_k`` expert ids; cells no expert needs go to a slot the call does not use (its
result is dropped with the row), or else to an expert that can take more. When no plan meets every
condition, :func:`pad_plan` returns None and the call runs as it is (its tokens may then differ in the last
bits, as before this module).
"""

from __future__ import annotations

from collections.abc import Mapping

#: rows per block of one expert in ``fused_experts_cpu``
BLOCK_M = 32
#: a block of at most this many rows takes the non-AMX path
SMALL_BLOCK = 4


def small_tail(step_count: int) -> int:
    """How many of an expert's last rows (token order) take the small path in a call of ``step_count`` rows
    for it (all of them when ``step_count <= SMALL_BLOCK``)."""
    if step_count <= SMALL_BLOCK:
        return step_count
    rest = step_count % BLOCK_M
    return rest if rest <= SMALL_BLOCK else 0


def pad_plan(counts: Mapping[int, tuple[int, int, int]], top_k: int, spare: int | None) -> list[list[int]] | None:
    """Dummy rows (``top_k`` ids each) to put in front of a call, or None when no plan gives stock's paths.

    ``counts[e] = (step, before, tail)``: expert (slot) ``e``'s row count in the whole step's call, and the
    call's rows for it outside and inside the step's small tail (:func:`small_tail`). ``spare``: an id the
    call's real rows do not use, or None.
    """
    need: dict[int, int] = {}  # expert -> dummy entries it must get
    flexible: dict[int, int] = {}  # expert -> how many more it may take (beyond need)
    for e, (step, before, tail) in counts.items():
        rows = before + tail
        if step <= SMALL_BLOCK:
            flexible[e] = SMALL_BLOCK - rows
            continue
        if tail:  # the rows before the tail fill whole blocks, the tail starts a block alone
            need[e] = -before % BLOCK_M
            continue
        d = 0
        while 0 < (d + rows) % BLOCK_M <= SMALL_BLOCK:
            d += 1
        need[e] = d
        # more dummies keep it large until the next block would start small
        room = 0
        while not 0 < (d + room + 1 + rows) % BLOCK_M <= SMALL_BLOCK and room < BLOCK_M:
            room += 1
        flexible[e] = room
    entries = [e for e, d in sorted(need.items()) for _ in range(d)]
    if not entries:
        return []
    cells = -len(entries) % top_k
    if spare is not None:
        entries += [spare] * cells
    else:
        for e, room in sorted(flexible.items(), key=lambda item: -item[1]):
            take = min(room, cells)
            entries += [e] * take
            cells -= take
        if cells:
            return None
    return [entries[i:i + top_k] for i in range(0, len(entries), top_k)]


def stock_paths_call(idx, x, topk_weights, slot_ids, step_ids, num_slots: int):
    """One call of a step's rows ``idx`` (ascending): its ``x``, ``topk_weights`` and ``slot_ids`` (the rows
    ``idx`` of the step's) with :func:`pad_plan`'s dummy rows in front, and how many there are (0: none).
    ``step_ids``: the whole step's expert ids [T, k]; ``num_slots``: the layer's slots."""
    import torch

    call_ids = step_ids[idx]  # [t, k]
    counts: dict[int, tuple[int, int, int]] = {}
    for expert, slot in sorted(set(zip(call_ids.flatten().tolist(), slot_ids.flatten().tolist()))):
        step_rows = (step_ids == expert).any(dim=-1)  # [T]
        step = int(step_rows.sum())
        call_rows = idx[(call_ids == expert).any(dim=-1)]  # the call's tokens using it, as step indices
        tail = small_tail(step) if step > SMALL_BLOCK else 0
        in_tail = int(torch.isin(call_rows, step_rows.nonzero().flatten()[-tail:]).sum()) if tail else 0
        counts[slot] = (step, call_rows.numel() - in_tail, in_tail)
    spare = next((s for s in range(num_slots) if s not in counts), None)
    plan = pad_plan(counts, slot_ids.shape[1], spare)
    if not plan:
        return x, topk_weights, slot_ids, 0
    n = len(plan)
    x = torch.cat([x.new_zeros(n, x.shape[1]), x])
    topk_weights = torch.cat([topk_weights.new_zeros(n, topk_weights.shape[1]), topk_weights])
    slot_ids = torch.cat([torch.tensor(plan, dtype=slot_ids.dtype, device=slot_ids.device), slot_ids])
    return x, topk_weights, slot_ids, n
