"""Override of vLLM's CPU platform's executor choice: with offload on, a single-rank engine keeps ``uni``.

What: after ``EngineArgs.create_engine_config`` (wrapped in ``engine_args.py``),
when offload is on, the backend is CPU, the engine has one rank and the user
asked for no other executor, sets ``parallel_config.distributed_executor_backend``
back to ``"uni"``, which ``CpuPlatform.check_and_update_config`` had turned into
``"mp"`` because multiprocessing is on. The worker then runs inside the
engine-core process, as it does on a GPU.
Why: vLLM's default CPU engine is three processes (front end, engine core,
worker), each holding its own torch and vLLM, about 0.4 GiB anonymous apiece.
On a box the experts do not fit, that memory is the expert cache's: under a
4.5 GiB limit it was 4 of 33 slots (README, "Bigger than memory"). The
platform's reason, that OpenMP cannot be set up without a worker process, does
not hold for the engine core: the front end spawns it after the platform set
OpenMP's environment (``LD_PRELOAD`` of torch's libgomp and tcmalloc, thread
binding) in ``os.environ``, so it inherits what the worker would. Checked by
``tests/integration/test_amx.py`` (tokens equal to stock in both layouts, in
vLLM's default multiprocess mode) and the serving tests.
Upstream: ``CpuPlatform.check_and_update_config`` keeping ``uni`` under
multiprocessing (the engine-core process is already a fresh one).
Remove when: vLLM's CPU platform keeps ``uni`` for a single rank.
Opt out: ``--distributed-executor-backend mp`` keeps vLLM's layout.
"""

from __future__ import annotations

import logging
from typing import Any

from vllm_moe_offload.patches import PatchContractError

logger = logging.getLogger("vllm.moe_offload.config")


def keep_uni_executor(parallel: Any, requested_backend: str | None) -> None:
    """``parallel``: the engine's ``ParallelConfig``; ``requested_backend``: the user's, None for vLLM's choice."""
    from vllm.platforms import current_platform

    for attr in ("world_size", "distributed_executor_backend"):
        if not hasattr(parallel, attr):
            raise PatchContractError(f"vllm-moe-offload: ParallelConfig.{attr} is missing; this vLLM is not supported")
    if not current_platform.is_cpu() or parallel.world_size != 1 or requested_backend not in (None, "uni"):
        return
    if parallel.distributed_executor_backend == "mp":
        parallel.distributed_executor_backend = "uni"
        logger.info("MoE offload: the worker runs in the engine-core process (one process fewer holding "
                    "torch and vLLM; --distributed-executor-backend mp keeps vLLM's own worker process)")
