"""Failing only the requests whose tokens needed an expert that could not be loaded.

When a read fails or times out, the offloaded layer computes every token that
does not need the missing expert (exactly as stock would) and leaves the rows
of the tokens that do at zero. Those tokens' requests are wrong from then on,
so they must end with an error and nothing else may be affected:

1. the layer maps its failed token rows to request ids (:func:`requests_of_rows`,
   from the model runner's input batch of the step being executed);
2. it records them here (:func:`report`);
3. the scheduler, right after the step's output (``patches/scheduler.py``),
   takes them (:func:`take`), drops the tokens sampled for them, finishes them
   with ``FINISHED_ERROR`` (the OpenAI server answers 500 / an error event) and
   evicts their KV blocks from the prefix cache, so that no later request
   reuses state computed without the expert.

The same row -> request mapping feeds the ``eap`` policy's activation paths
(:func:`request_of_each_row`, :func:`live_requests`).

Both sides run in the engine-core process (vLLM's in-process executor, which the
plugin's single-rank workers use), so the registry is a process-local dict.
Outside a scheduled step (start-up's dummy runs) or with several ranks there is
no request to blame: the layer re-raises and the engine stops with the error.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable

logger = logging.getLogger("vllm.moe_offload.faults")

_lock = threading.Lock()
_failed: dict[str, str] = {}  # request id -> reason
_runner = None  # the model runner whose input batch maps token rows to requests
_in_step = False


def bind_runner(runner) -> None:
    """Tell the layers which model runner executes steps in this process (single rank only)."""
    global _runner
    _runner = runner


class step:  # noqa: N801 - used as a context manager, like a function
    """Marks the worker's ``execute_model`` of a scheduled step (dummy runs are outside)."""

    def __enter__(self) -> None:
        global _in_step
        _in_step = True

    def __exit__(self, *exc) -> None:
        global _in_step
        _in_step = False


def requests_of_rows(rows: Iterable[int]) -> set[str] | None:
    """Request ids of the token rows ``rows`` of the step being executed; None when unknown."""
    rows = list(rows)
    owners = request_of_each_row(max(rows, default=-1) + 1)
    if owners is None:
        return None
    return {owners[row] for row in rows if owners[row] is not None}


def request_of_each_row(num_rows: int) -> list[str | None] | None:
    """The request id of each of the step's ``num_rows`` token rows (None: padding); None when unknown.

    Rows follow the runner's input batch: request ``i`` owns rows
    ``[query_start_loc[i], query_start_loc[i + 1])``; rows past the last request
    are padding and belong to nobody.
    """
    runner = _runner
    if runner is None or not _in_step:
        return None
    batch = runner.input_batch
    num_reqs = batch.num_reqs
    starts = runner.query_start_loc.np[: num_reqs + 1].tolist()  # [R + 1]
    out: list[str | None] = []
    for req_id, lo, hi in zip(batch.req_ids[:num_reqs], starts, starts[1:]):
        out.extend([req_id] * (hi - lo))
    return (out + [None] * num_rows)[:num_rows]


def live_requests() -> set[str] | None:
    """Every request the runner holds now (scheduled this step or not); None when unknown."""
    runner = _runner
    if runner is None:
        return None
    return {r for r in runner.input_batch.req_ids if r is not None}


def report(request_ids: Iterable[str], reason: str) -> None:
    with _lock:
        for req_id in request_ids:
            _failed.setdefault(req_id, reason)


def take() -> dict[str, str]:
    """The requests reported since the last call, with why (and forget them)."""
    global _failed
    with _lock:
        failed, _failed = _failed, {}
    return failed
