"""How a trace is replayed: budgets in slots, and the order of steps and passes.

Two views of a trace (``mode``):

* ``per-sequence`` (default): every sequence alone, with a cache of its own that
  starts empty; its rows in position order, one row per step (the batch-1
  decode view of ``shared/traces/README.md``'s reference table);
* ``shared``: one cache for the whole trace; the trace's steps in order, each
  step running all of its rows (several sequences interleaved, prefill chunks).

Within a step, one layer's tokens are split into passes that each need at most
the layer's slots (``cache.pack_passes``, as the runtime does); a pass's needs
are its tokens' distinct experts in token order, then gate order.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from vllm_moe_offload.core.cache import pack_passes
from vllm_moe_offload.core.traces import Trace

MODES = ("per-sequence", "shared")

_SLOTS_RE = re.compile(r"^\s*(\d+)\s*$")
_PCT_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")


@dataclass(frozen=True)
class SlotBudget:
    """Slots per layer: a count, or a share of the layer's experts (rounded down)."""

    slots: int | None = None
    fraction: float | None = None

    @classmethod
    def parse(cls, text: str) -> SlotBudget:
        """``"4"`` (slots) or ``"12.5%"`` (of the experts); raises ``ValueError`` otherwise."""
        if m := _SLOTS_RE.match(text):
            if int(m.group(1)) < 1:
                raise ValueError(f"budget {text!r} must be at least 1 slot")
            return cls(slots=int(m.group(1)))
        if m := _PCT_RE.match(text):
            pct = float(m.group(1))
            if not 0 < pct <= 100:
                raise ValueError(f"budget {text!r} must lie in (0%, 100%]")
            return cls(fraction=pct / 100)
        raise ValueError(f"budget {text!r} is neither a slot count (4) nor a share of the experts (25%)")

    def resolve(self, num_experts: int) -> int:
        """Slots per layer for a layer of ``num_experts`` experts (at most all of them)."""
        if self.fraction is not None:
            # Rounded down: a budget is a limit; the epsilon keeps 12.5% of 8 at 1.
            return max(1, math.floor(self.fraction * num_experts + 1e-9))
        assert self.slots is not None
        return min(self.slots, num_experts)

    def __str__(self) -> str:
        return f"{self.fraction * 100:g}%" if self.fraction is not None else str(self.slots)


def parse_budgets(text: str) -> list[SlotBudget]:
    """Comma-separated budgets, e.g. ``"2,4,6"`` or ``"12.5%,25%,50%"``."""
    return [SlotBudget.parse(part) for part in text.split(",") if part.strip()]


@dataclass(frozen=True)
class StepPlan:
    """One step of a replay."""

    rows: np.ndarray  # [T] trace rows, batch order
    passes: list[list[list[int]]]  # [layer][pass] -> distinct experts the pass needs
    ended: tuple[int, ...]  # sequences whose last token runs in this step


def build_schedules(trace: Trace, mode: str, slots: Sequence[int]) -> list[list[StepPlan]]:
    """Steps to replay, one list per cache lifetime (per sequence, or one shared).

    ``slots[layer]`` bounds each pass's distinct experts; raises ``ValueError``
    when one token needs more experts than its layer has slots.
    """
    if len(slots) != trace.num_trace_layers:
        raise ValueError(f"{len(slots)} slot counts for {trace.num_trace_layers} traced layers")
    topk_ids = trace.topk_ids.tolist()  # nested lists: much faster to index than numpy
    if mode == "per-sequence":
        return [
            _plan([np.array([r]) for r in trace.sequence_rows(seq)], topk_ids, trace, slots)
            for seq in trace.sequences()
        ]
    if mode == "shared":
        return [_plan(trace.step_rows(), topk_ids, trace, slots)]
    raise ValueError(f"unknown mode {mode!r}; allowed: {list(MODES)}")


def _plan(steps: list[np.ndarray], topk_ids: list, trace: Trace, slots: Sequence[int]) -> list[StepPlan]:
    last_step = {}
    for index, rows in enumerate(steps):
        for seq in trace.seq_ids[rows].tolist():
            last_step[seq] = index
    ended: dict[int, list[int]] = {}
    for seq, index in last_step.items():
        ended.setdefault(index, []).append(seq)
    plans = []
    for index, rows in enumerate(steps):
        row_list = rows.tolist()
        passes = [_layer_passes([topk_ids[r][layer] for r in row_list], n) for layer, n in enumerate(slots)]
        plans.append(StepPlan(rows=rows, passes=passes, ended=tuple(ended.get(index, ()))))
    return plans


def _layer_passes(token_experts: list[list[int]], num_slots: int) -> list[list[int]]:
    if len(token_experts) == 1:  # the batch-1 fast path
        needed = list(dict.fromkeys(token_experts[0]))
        if len(needed) > num_slots:
            raise ValueError(f"a token needs {len(needed)} experts but only {num_slots} slots exist")
        return [needed]
    return [
        list(dict.fromkeys(e for t in tokens for e in token_experts[t]))
        for tokens in pack_passes(token_experts, num_slots)
    ]


def replay_length(trace: Trace, mode: str) -> int:
    """Steps in one replay of ``trace`` under ``mode`` (for progress bars)."""
    if mode == "per-sequence":
        return trace.num_tokens
    return len(np.unique(trace.step_ids))
