"""Klotski's multi-batch groups inside vLLM's continuous batching (``klotski_features`` ``groups``).

Klotski shares every expert load across ``n`` batches: their attention runs
one after the other, then each loaded expert computes the tokens of all ``n``.
In vLLM every running request is already in the one batch of a step, so a
group of ``n`` batches is a step with ``n`` times the tokens. What limits a
step is its token budget (``--max-num-batched-tokens``): a long prompt, or many
prompts arriving together, are cut into chunks of that size, and at a small
expert budget each chunk reads nearly every expert of every layer again.

With ``groups`` on, :func:`widen_token_budget` (at config time) sizes the
model runner for ``klotski_max_group`` times the user's token budget and keeps
the scheduler at the user's budget; :class:`KlotskiScheduler` then lets each
step take up to ``klotski_max_group`` times it while loading dominates, that is
while the planner's last plan (``core/klotski_plan.py``, fed by the routing
observer with what this host measured) is not overlapped, or no plan exists yet.
When a plan is overlapped, the loads of a step of the user's size hide behind
its compute and the step stays at that size.

Bounds. The scheduler's order is vLLM's own (running requests first, then
waiting ones in arrival order), and only the size of a step changes, so no
request starves. A request's first token waits at most one step longer than
with the user's budget, and a step holds at most ``klotski_max_group`` times
that budget in tokens; the KV cache and ``--max-num-seqs`` bound it as in
stock vLLM. Steps are never held back to wait for more requests.

The plan reaches the scheduler through this module only where both run in one
process (one rank: vLLM's in-process executor); with several ranks there is
no plan on the scheduler's side and every step may take the widened budget.
"""

from __future__ import annotations

import logging
from typing import Any

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler

logger = logging.getLogger("vllm.moe_offload.scheduler")

#: the observer's latest answer to "do loads hide behind compute at this step size?" (None: no plan yet)
_overlapped: bool | None = None
#: steps scheduled, and those that took more than the user's token budget (for the statistics)
_counts = {"steps": 0, "grouped_steps": 0}
_active = False  # a grouping scheduler runs for the engine being built or run in this process


def reset() -> None:
    """A new engine is being built in this process (its workers load before its scheduler exists)."""
    global _overlapped, _active
    _overlapped, _active = None, False
    _counts.update(steps=0, grouped_steps=0)


def counts() -> dict[str, int]:
    """Steps this engine's grouping scheduler ran, and how many were widened ({} without one)."""
    return dict(_counts) if _active else {}


def note_plan(overlapped: bool | None) -> None:
    """Called by the routing observer whenever it re-plans (same process as the scheduler, one rank).

    ``overlapped``: the plan's verdict, None when its costs were not measured yet.
    """
    global _overlapped
    _overlapped = overlapped


def widen_token_budget(scheduler_config: Any, max_group: int) -> int:
    """Size the runner for ``max_group`` times the token budget, keep the scheduler at it; returns it.

    The model runner allocates its input buffers from ``max_num_batched_tokens``
    once; the scheduler issues at most ``max_num_scheduled_tokens`` per step,
    which :class:`KlotskiScheduler` raises step by step up to the runner's size.
    """
    base = scheduler_config.max_num_scheduled_tokens or scheduler_config.max_num_batched_tokens
    scheduler_config.max_num_scheduled_tokens = base
    scheduler_config.max_num_batched_tokens = base * max_group
    scheduler_config.scheduler_cls = (
        f"{__name__}.KlotskiAsyncScheduler" if scheduler_config.async_scheduling else f"{__name__}.KlotskiScheduler"
    )
    return base


class _GroupedSteps:
    """Mixin over vLLM's scheduler: each step's token budget follows the Klotski plan."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        global _active
        super().__init__(*args, **kwargs)
        _active = True
        config = self.scheduler_config
        self.moe_offload_base_tokens = self.max_num_scheduled_tokens
        self.moe_offload_max_tokens = config.max_num_batched_tokens
        self._moe_offload_widened: bool | None = None
        logger.info(
            "MoE offload (klotski groups): steps take %d tokens, up to %d while expert loads dominate",
            self.moe_offload_base_tokens, self.moe_offload_max_tokens,
        )

    def schedule(self, *args: Any, **kwargs: Any):
        widen = _overlapped is not True  # loads dominate, or nothing measured yet
        self.max_num_scheduled_tokens = self.moe_offload_max_tokens if widen else self.moe_offload_base_tokens
        if widen != self._moe_offload_widened:
            self._moe_offload_widened = widen
            logger.debug("MoE offload (klotski groups): step token budget now %d", self.max_num_scheduled_tokens)
        out = super().schedule(*args, **kwargs)
        if out.total_num_scheduled_tokens:
            _counts["steps"] += 1
        if out.total_num_scheduled_tokens > self.moe_offload_base_tokens:
            _counts["grouped_steps"] += 1
        return out


class KlotskiScheduler(_GroupedSteps, Scheduler):
    """vLLM's synchronous scheduler with Klotski's grouped steps."""


class KlotskiAsyncScheduler(_GroupedSteps, AsyncScheduler):
    """vLLM's asynchronous scheduler with Klotski's grouped steps."""
