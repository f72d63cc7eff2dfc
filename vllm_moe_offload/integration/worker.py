"""vLLM workers with MoE offload: they own the slot pools, the transfer engine and the statistics.

Selected for the user when offload is on (``patches/engine_args.py``). Their
extra RPC method ``moe_offload_stats`` answers ``LLM.collective_rpc``. After
each step's forward they collect the requests a failed expert read must fail
(combined over the tensor-parallel ranks) and send them to the scheduler with
the step's output (``integration/faults.py``).
"""

from __future__ import annotations

import logging

from vllm.distributed.parallel_state import get_tp_group
from vllm.v1.worker.cpu_worker import CPUWorker
from vllm.v1.worker.gpu_worker import Worker

from vllm_moe_offload.core.stats import format_summary
from vllm_moe_offload.integration import faults

logger = logging.getLogger("vllm.moe_offload.worker")


class OffloadWorkerMixin:
    _moe_offload = None
    #: the tensor-parallel group's CPU group when requests are failed across ranks (TP > 1)
    _fault_group = None
    #: requests failed by this step's forward, for the output ``sample_tokens`` returns
    _failed_requests: dict[str, str] = {}

    def load_model(self, *args, **kwargs) -> None:
        from vllm.config import set_current_vllm_config

        from vllm_moe_offload.integration.engine_config import offload_config_of
        from vllm_moe_offload.integration.layer_classes import register_model_classes
        from vllm_moe_offload.integration.setup import build_offload

        offload = offload_config_of(self.vllm_config)
        if offload is not None and offload.enabled:
            # the model's own RoutedExperts subclasses (gpt-oss, DBRX, the Transformers backend) get an
            # offloaded class under their names before the model is built (integration/layer_classes.py)
            register_model_classes(self.vllm_config)
        super().load_model(*args, **kwargs)
        with set_current_vllm_config(self.vllm_config):
            self._moe_offload = build_offload(self.model_runner.get_model(), self.vllm_config)
        if self._moe_offload is not None and self.vllm_config.parallel_config.pipeline_parallel_size == 1:
            # every rank maps its failed rows to requests; the ranks of a TP group
            # combine them after each step (with PP, earlier stages' failures could
            # not reach the output rank: the layer re-raises instead)
            faults.bind_runner(self.model_runner)
            tp_group = get_tp_group()
            if tp_group.world_size > 1:
                self._fault_group = tp_group.cpu_group

    def execute_model(self, *args, **kwargs):
        with faults.step():
            output = super().execute_model(*args, **kwargs)
        if self._moe_offload is None:
            return output
        failed = faults.take()
        if self._fault_group is not None:
            failed = faults.combine(failed, self._fault_group)
        if not failed:
            return output
        if output is None:  # the step's output comes from sample_tokens
            self._failed_requests = failed
            return None
        return faults.attach(output, failed)

    def sample_tokens(self, *args, **kwargs):
        output = super().sample_tokens(*args, **kwargs)
        if self._moe_offload is not None and self._moe_offload.token_prefetch is not None:
            self._moe_offload.token_prefetch.after_sampling(output)  # batch-1 decode: the next step's experts
        failed, self._failed_requests = self._failed_requests, {}
        return faults.attach(output, failed) if failed else output

    def moe_offload_stats(self) -> dict:
        """Per-layer and total counters of this worker's expert cache ({} when inactive)."""
        return self._moe_offload.stats() if self._moe_offload is not None else {}

    def shutdown(self) -> None:
        offload, self._moe_offload = self._moe_offload, None
        if offload is not None:
            try:
                logger.info("MoE offload at shutdown: %s", format_summary(offload.stats()["total"]))
                offload.close()
            except Exception:  # noqa: BLE001 - vLLM's own teardown (distributed state, its files) must still run
                logger.exception("MoE offload: closing failed")
        super().shutdown()


class OffloadCPUWorker(OffloadWorkerMixin, CPUWorker):
    """CPU backend worker with MoE offload."""


class OffloadGPUWorker(OffloadWorkerMixin, Worker):
    """CUDA worker with MoE offload."""
