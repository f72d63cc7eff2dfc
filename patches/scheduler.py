"""Patch of ``vllm.v1.core.sched.scheduler.Scheduler.update_from_output``: requests an expert read failed.

What: after each step's output, takes the requests whose tokens needed an
expert that could not be loaded, which the workers attach to the step's
``ModelRunnerOutput`` (``integration/faults.py``; with tensor parallelism the
union over the ranks, carried from the worker processes by vLLM's executor
with the output it sends anyway), drops the tokens
sampled for them in that step, finishes them with ``FINISHED_ERROR`` (clients
see an error; the OpenAI server answers 500 or an error event) and evicts
their KV blocks from the prefix cache.
Why: a failed read must fail the requests that needed the expert and nothing
else. vLLM finishes requests with an error only for its own causes (KV-load
failures, grammar errors), and an exception in the forward pass stops the
engine with every request in it.
Upstream: a worker-side way to fail individual requests of a step (for
example a ``failed_req_ids`` field of ``ModelRunnerOutput``).
Remove when: vLLM has such a field; re-check on every vLLM bump (the contract
checks below fail loudly when the method or the fields it uses change).
"""

from __future__ import annotations

import logging

from vllm_moe_offload.patches import PatchContractError, expect_params, is_patched, mark

logger = logging.getLogger("vllm.moe_offload.patches.scheduler")


def apply() -> None:
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs
    from vllm.v1.outputs import ModelRunnerOutput
    from vllm.v1.request import RequestStatus

    if is_patched(Scheduler, "update_from_output"):
        return
    original = expect_params(Scheduler, "update_from_output", ["self", "scheduler_output", "model_runner_output"])
    for method in ("finish_requests",):
        if not hasattr(Scheduler, method):
            raise PatchContractError(f"vllm-moe-offload: Scheduler.{method} is missing; this vLLM is not supported")
    if not hasattr(RequestStatus, "FINISHED_ERROR"):
        raise PatchContractError("vllm-moe-offload: RequestStatus.FINISHED_ERROR is missing; this vLLM is not supported")
    if hasattr(ModelRunnerOutput, "__slots__"):
        # the failed requests ride on the output as an extra attribute, which must survive pickling
        raise PatchContractError("vllm-moe-offload: ModelRunnerOutput has __slots__; this vLLM is not supported")

    def update_from_output(self, scheduler_output, model_runner_output):
        from vllm_moe_offload.integration import faults

        failed = {r: why for r, why in faults.failed_of(model_runner_output).items() if r in self.requests}
        if not failed:
            return original(self, scheduler_output, model_runner_output)
        sampled = model_runner_output.sampled_token_ids
        for req_id in failed:
            idx = model_runner_output.req_id_to_index.get(req_id)
            if idx is not None and idx < len(sampled):
                sampled[idx] = []  # sampled from hidden states computed without an expert
        blocks = {b for req_id in failed for group in self.kv_cache_manager.get_block_ids(req_id) for b in group}
        outputs = original(self, scheduler_output, model_runner_output)
        for request in self.finish_requests(failed, RequestStatus.FINISHED_ERROR):
            logger.error("request %s failed: %s", request.request_id, failed[request.request_id])
            out = EngineCoreOutput(
                request_id=request.request_id, new_token_ids=[], finish_reason=request.get_finished_reason(),
                events=request.take_events(), trace_headers=request.trace_headers,
            )
            outputs.setdefault(request.client_index, EngineCoreOutputs(outputs=[])).outputs.append(out)
        self.kv_cache_manager.evict_blocks(blocks)
        return outputs

    Scheduler.update_from_output = mark(update_from_output, original)
