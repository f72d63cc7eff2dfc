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
stock vLLM.

Held decode steps (``klotski_hold_ms``). While loads dominate (the last plan
is measured and not overlapped), a step whose requests are all decoding, with
no request waiting and room for more (fewer running than ``--max-num-seqs``),
is held: the scheduler returns empty steps (as vLLM's own pause does), sleeping
at most ``_HOLD_POLL_S`` in each, until a request arrives (it then joins the
step, sharing its expert loads) or the hold's bound passes. Bounds: a step is
held at most ``min(klotski_hold_ms, one step's planned loads)`` plus one empty
step's turn (``_HOLD_POLL_S`` and the engine's bookkeeping); so a decoding
request's time per token grows by at most that bound, and no more often than
once per step. A hold never starts or goes on while a request waits, so a new
request's first token is never delayed by a hold (its arrival ends the hold),
and the order of requests is vLLM's, so none starves. ``held_steps``,
``holds_joined`` (ended by an arrival) and ``hold_ms_max`` are in the statistics.

The plan reaches the scheduler through this module only where both run in one
process (one rank: vLLM's in-process executor); with several ranks there is
no plan on the scheduler's side and every step may take the widened budget.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler

from vllm_moe_offload.integration.engine_config import offload_config_of

logger = logging.getLogger("vllm.moe_offload.scheduler")

#: the observer's latest answer to "do loads hide behind compute at this step size?" (None: no plan yet)
_overlapped: bool | None = None
#: the loads of one step as last planned, in seconds (a held step waits no longer)
_step_loads_s = 0.0
#: steps scheduled, those that took more than the user's token budget, those held and those a request
#: joined while held (for the statistics)
_counts = {"steps": 0, "grouped_steps": 0, "held_steps": 0, "holds_joined": 0}
_hold_ms_max = 0.0  # the longest hold of a step
_active = False  # a grouping scheduler runs for the engine being built or run in this process

#: longest sleep in one held (empty) step: arrivals are seen between steps, so this is how late
#: an arrival may end a hold; short against a step's loads (milliseconds to a second)
_HOLD_POLL_S = 0.001


def reset() -> None:
    """A new engine is being built in this process (its workers load before its scheduler exists)."""
    global _overlapped, _step_loads_s, _hold_ms_max, _active
    _overlapped, _step_loads_s, _hold_ms_max, _active = None, 0.0, 0.0, False
    _counts.update(steps=0, grouped_steps=0, held_steps=0, holds_joined=0)


def counts() -> dict[str, int | float]:
    """Steps this engine's grouping scheduler ran, widened and held ({} without one)."""
    return {**_counts, "hold_ms_max": _hold_ms_max} if _active else {}


def note_plan(overlapped: bool | None, step_loads_ms: float = 0.0) -> None:
    """Called by the routing observer whenever it re-plans (same process as the scheduler, one rank).

    ``overlapped``: the plan's verdict, None when its costs were not measured yet.
    ``step_loads_ms``: the loads the plan expects in one step (all MoE layers).
    """
    global _overlapped, _step_loads_s
    _overlapped, _step_loads_s = overlapped, max(0.0, step_loads_ms) / 1e3


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
        offload = offload_config_of(self.vllm_config)
        self.moe_offload_hold_s = (offload.klotski_hold_ms if offload is not None else 0.0) / 1e3
        self._moe_offload_held_since: float | None = None  # when the step being held was first held
        logger.info(
            "MoE offload (klotski groups): steps take %d tokens, up to %d while expert loads dominate; "
            "decode steps held up to %g ms for arriving requests",
            self.moe_offload_base_tokens, self.moe_offload_max_tokens, self.moe_offload_hold_s * 1e3,
        )

    def _moe_offload_hold_bound_s(self) -> float:
        """The longest a step may be held: ``klotski_hold_ms``, and no longer than one step's planned loads."""
        return min(self.moe_offload_hold_s, _step_loads_s)

    def _moe_offload_hold(self) -> bool:
        """Whether to hold this step (rules and bounds: module docstring); ends and records holds."""
        num_running, num_waiting = self.get_request_counts()
        could = (
            self._moe_offload_hold_bound_s() > 0 and _overlapped is False and num_running and not num_waiting
            and num_running < self.max_num_running_reqs
            and not any(getattr(r, "is_prefill_chunk", False) for r in self.running)
        )
        now = time.monotonic()
        if could and self._moe_offload_held_since is None:
            self._moe_offload_held_since = now
            _counts["held_steps"] += 1
        held_since = self._moe_offload_held_since
        if held_since is None:
            return False
        if could and now - held_since < self._moe_offload_hold_bound_s():
            return True
        global _hold_ms_max
        _hold_ms_max = max(_hold_ms_max, (now - held_since) * 1e3)
        if num_waiting:
            _counts["holds_joined"] += 1
        self._moe_offload_held_since = None
        return False

    def schedule(self, *args: Any, **kwargs: Any):
        if self._moe_offload_hold():
            self.max_num_scheduled_tokens = 0  # an empty step, as vLLM's pause makes
            out = super().schedule(*args, **kwargs)
            left_s = self._moe_offload_held_since + self._moe_offload_hold_bound_s() - time.monotonic()
            time.sleep(min(_HOLD_POLL_S, max(0.0, left_s)))  # arrivals are taken in between steps
            return out
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
