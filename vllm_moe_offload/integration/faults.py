"""Failing only the requests whose tokens needed an expert that could not be loaded.

When a read fails or times out, the offloaded layer computes every token that
does not need the missing expert (exactly as stock would) and leaves the rows
of the tokens that do at zero. Those tokens' requests are wrong from then on,
so they must end with an error and nothing else may be affected:

1. the layer maps its failed token rows to request ids (:func:`requests_of_rows`,
   from the model runner's input batch of the step being executed);
2. it records them here (:func:`report`);
3. after the step's forward, the worker takes them (:func:`take`); with tensor
   parallelism the ranks combine theirs (:func:`combine`) and every rank fails
   the union;
4. the worker attaches them to the step's ``ModelRunnerOutput`` (:func:`attach`),
   which reaches the engine-core process as it is (pickled, with its extra
   attribute, by vLLM's multiprocess executor);
5. the scheduler, right after the step's output (``patches/scheduler.py``),
   reads them (:func:`failed_of`), drops the tokens sampled for them, finishes
   them with ``FINISHED_ERROR`` (the OpenAI server answers 500 / an error event)
   and evicts their KV blocks from the prefix cache, so that no later request
   reuses state computed without the expert.

Why the union is right with tensor parallelism: each rank computes its shard of
every expert and the layer's output is the all-reduced sum of the shards. A row
that one rank zeroed is wrong after the reduce on every rank (it holds only the
other ranks' shards) whether or not they zeroed it too; the reduce is row-wise,
so every other row is exactly stock's. Routing is computed from the reduced,
replicated hidden states, so every rank routes (and maps rows to requests) alike.

The same row -> request mapping feeds the ``eap`` policy's activation paths
(:func:`request_of_each_row`, :func:`live_requests`).

Outside a scheduled step (start-up's dummy runs) or with pipeline parallelism
there is no request to blame: the layer re-raises and the engine stops with
the error.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Iterable

import torch
import torch.distributed as dist
from vllm.v1.outputs import AsyncModelRunnerOutput

logger = logging.getLogger("vllm.moe_offload.faults")

_lock = threading.Lock()
_failed: dict[str, str] = {}  # request id -> reason
_runner = None  # the model runner whose input batch maps token rows to requests
_in_step = False

#: the attribute of a step's ``ModelRunnerOutput`` that carries its failed requests (id -> why)
OUTPUT_ATTR = "moe_offload_failed_requests"


def bind_runner(runner) -> None:
    """Tell the layers which model runner executes steps in this process (every tensor-parallel rank)."""
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

#: the attribute of a step's ``ModelRunnerOutput`` that carries its failed requests (id -> why)
OUTPUT_ATTR = "moe_offload_failed_requests"


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


def combine(failed: dict[str, str], cpu_group) -> dict[str, str]:
    """The union of every rank's ``failed`` over a tensor-parallel group; every rank calls it once a step.

    A step where no rank failed anything costs one all-reduce of one integer on
    the group's CPU (gloo) group; the ids travel only when some rank has any.
    """
    count = torch.tensor([len(failed)], dtype=torch.int64)  # [1]
    dist.all_reduce(count, group=cpu_group)
    if not int(count.item()):
        return failed
    parts: list[dict[str, str] | None] = [None] * dist.get_world_size(cpu_group)
    dist.all_gather_object(parts, failed, group=cpu_group)
    union: dict[str, str] = {}
    for part in parts:
        for req_id, reason in (part or {}).items():
            union.setdefault(req_id, reason)
    return union


def attach(output, failed: dict[str, str]):
    """``output`` (a step's ``ModelRunnerOutput``, or its async wrapper) carrying ``failed`` to the scheduler.

    Returns a shallow copy: vLLM reuses some outputs (``EMPTY_MODEL_RUNNER_OUTPUT``).
    """
    if isinstance(output, AsyncModelRunnerOutput):
        get_output = output.get_output
        output.get_output = lambda: attach(get_output(), failed)
        return output
    output = copy.copy(output)
    setattr(output, OUTPUT_ATTR, dict(failed))
    return output


def failed_of(output) -> dict[str, str]:
    """The failed requests (id -> why) a step's ``ModelRunnerOutput`` carries ({} for most steps)."""
    return getattr(output, OUTPUT_ATTR, None) or {}
