"""Override of vLLM's CPU platform's executor choice: with offload on, a single-rank engine keeps ``uni``.

What: after ``EngineArgs.create_engine_config`` (wrapped in ``engine_args.py``),
when offload is on, the backend is CPU, the engine has one rank and the user
asked for no other executor, sets ``parallel_config.distributed_executor_backend``
back to ``"uni"``, which ``CpuPlatform.check_and_update_config`` had turned into
``"mp"`` because multiprocessing is on. The worker then runs inside the
engine-core process, as it does on a GPU. And (:func:`apply`, wrapping
``CoreEngineProcManager.__init__``, where the front end spawns the engine core)
that engine core is spawned with the number of OpenMP threads vLLM's
multiprocess executor gives its worker (``OMPProcessManager``, rank 0;
``VLLM_CPU_OMP_THREADS_BIND`` honoured), so it computes with as many threads
(its binding is left out: :func:`engine_core_openmp`).
Why: vLLM's default CPU engine is three processes (front end, engine core,
worker), each holding its own torch and vLLM, about 0.4 GiB anonymous apiece.
On a box the experts do not fit, that memory is the expert cache's: under a
4.5 GiB limit it was 4 of 33 slots (README, "Bigger than memory"). The
platform's reason, that OpenMP cannot be set up without a worker process, does
not hold for the engine core, a fresh process too. Without the environment the
engine core ran OpenMP on every core: on a 2-core machine 2 threads where
stock's worker runs 1, which changed the kernels' reduction order (greedy
tokens differed from stock's at the 117th token of a 128-token decode on the
padded tiny-mixtral) and made all-resident runs look 1.2-1.6x faster than stock.
Checked by ``tests/integration/test_amx.py`` (tokens equal to stock in both
layouts, in vLLM's default multiprocess mode, and the engine core's thread count
equal to stock's worker's), ``test_process_layout.py`` (the executor choice) and
the serving tests.
Upstream: ``CpuPlatform.check_and_update_config`` keeping ``uni`` under
multiprocessing, and the engine core spawned with the OpenMP environment then.
Remove when: vLLM's CPU platform keeps ``uni`` for a single rank.
Opt out: ``--distributed-executor-backend mp`` keeps vLLM's layout.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator
from typing import Any

from vllm_moe_offload.patches import PatchContractError, expect_attrs, expect_params, is_patched, mark

logger = logging.getLogger("vllm.moe_offload.config")


def keep_uni_executor(parallel: Any, requested_backend: str | None) -> None:
    """``parallel``: the engine's ``ParallelConfig``; ``requested_backend``: the user's, None for vLLM's choice."""
    from vllm.platforms import current_platform

    expect_attrs(parallel, "ParallelConfig", ("world_size", "distributed_executor_backend"))
    if not current_platform.is_cpu() or parallel.world_size != 1 or requested_backend not in (None, "uni"):
        return
    if parallel.distributed_executor_backend == "mp":
        parallel.distributed_executor_backend = "uni"
        logger.info("MoE offload: the worker runs in the engine-core process (one process fewer holding "
                    "torch and vLLM; --distributed-executor-backend mp keeps vLLM's own worker process)")


def apply() -> None:
    """Spawn a CPU engine core that runs its own worker (``uni``) with the worker's OpenMP thread count."""
    from vllm.v1.engine.utils import CoreEngineProcManager

    if is_patched(CoreEngineProcManager, "__init__"):
        return
    orig_init = expect_params(CoreEngineProcManager, "__init__", ["self", "local_engine_count", "start_index",
                                                                   "local_start_index", "vllm_config"])
    signature = inspect.signature(orig_init)
    if "executor_class" not in signature.parameters:
        raise PatchContractError("vllm-moe-offload: CoreEngineProcManager.__init__ takes no executor_class; "
                                 "this vLLM is not supported")

    def __init__(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs).arguments
        with engine_core_openmp(bound["vllm_config"], bound["executor_class"], bound["local_engine_count"]):
            orig_init(self, *args, **kwargs)

    CoreEngineProcManager.__init__ = mark(__init__, orig_init)


@contextlib.contextmanager
def engine_core_openmp(vllm_config: Any, executor_class: type, local_engine_count: int) -> Iterator[None]:
    """While the engine core is spawned: ``OMP_NUM_THREADS`` of rank 0's worker, where it runs that worker.

    The count vLLM's multiprocess executor would give the worker
    (``OMPProcessManager``: the cores of ``VLLM_CPU_OMP_THREADS_BIND``, by
    default one NUMA node's less the cores it reserves for the other
    processes; nothing with ``nobind``). The binding that executor adds is
    left out: the engine core also runs the expert loader, the scheduler and
    vLLM's socket threads, which would all inherit the compute cores; pinned
    so, batch-1 decode of the padded tiny-mixtral at 25% stalled 6.8-6.9 ms per
    token on loads instead of 4.0 (same bytes read), and the engine is as fast
    as stock's worker without it (at 100%: 1.01x stock's decode).
    Only a CPU engine with offload on, the ``uni`` executor (which, on CPU
    under multiprocessing, only :func:`keep_uni_executor` leaves) and one local
    engine; anything else is spawned as vLLM would.
    """
    from vllm.platforms import current_platform
    from vllm.utils.ompmultiprocessing import OMPProcessManager
    from vllm.utils.system_utils import set_env_var
    from vllm.v1.executor.uniproc_executor import UniProcExecutor

    from vllm_moe_offload.integration.engine_config import offload_config_of

    offload = offload_config_of(vllm_config)
    if (offload is None or not offload.enabled or not current_platform.is_cpu() or local_engine_count != 1
            or not issubclass(executor_class, UniProcExecutor)):
        yield
        return
    manager = OMPProcessManager(vllm_config)
    expect_attrs(manager, "OMPProcessManager", ("skip_setup", "cpu_lists"))
    if manager.skip_setup or not manager.cpu_lists:
        yield
        return
    threads = str(len(manager.cpu_lists[0]))
    logger.info("MoE offload: the engine core computes with %s OpenMP thread(s), as vLLM's worker would", threads)
    with set_env_var("OMP_NUM_THREADS", threads):
        yield
