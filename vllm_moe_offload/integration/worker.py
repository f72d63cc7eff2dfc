"""vLLM workers with MoE offload: they own the slot pools, the transfer engine and the statistics.

Selected for the user when offload is on (``patches/engine_args.py``). Their
extra RPC method ``moe_offload_stats`` answers ``LLM.collective_rpc``.
"""

from __future__ import annotations

import logging

from vllm.v1.worker.cpu_worker import CPUWorker
from vllm.v1.worker.gpu_worker import Worker

from vllm_moe_offload.core.stats import format_summary
from vllm_moe_offload.integration import faults

logger = logging.getLogger("vllm.moe_offload.worker")


class OffloadWorkerMixin:
    _moe_offload = None

    def load_model(self, *args, **kwargs) -> None:
        from vllm.config import set_current_vllm_config

        from vllm_moe_offload.integration.setup import build_offload

        super().load_model(*args, **kwargs)
        with set_current_vllm_config(self.vllm_config):
            self._moe_offload = build_offload(self.model_runner.get_model(), self.vllm_config)
        if self._moe_offload is not None and self.vllm_config.parallel_config.world_size == 1:
            # one rank: the scheduler is in this process and can fail single requests
            faults.bind_runner(self.model_runner)

    def execute_model(self, *args, **kwargs):
        with faults.step():
            return super().execute_model(*args, **kwargs)

    def moe_offload_stats(self) -> dict:
        """Per-layer and total counters of this worker's expert cache ({} when inactive)."""
        return self._moe_offload.stats() if self._moe_offload is not None else {}

    def shutdown(self) -> None:
        if self._moe_offload is not None:
            logger.info("MoE offload at shutdown: %s", format_summary(self._moe_offload.stats()["total"]))
            self._moe_offload.close()
            self._moe_offload = None
        super().shutdown()


class OffloadCPUWorker(OffloadWorkerMixin, CPUWorker):
    """CPU backend worker with MoE offload."""


class OffloadGPUWorker(OffloadWorkerMixin, Worker):
    """CUDA worker with MoE offload."""
