"""Where the worker runs: with offload on, a single-rank CPU engine keeps it in the engine-core process.

vLLM's CPU platform turns the ``uni`` executor into ``mp`` whenever multiprocessing
is on, which costs a third process holding torch and vLLM (about 0.4 GiB that
the expert cache would rather have under a memory limit). The engine runs of
this layout, tokens against stock included, are in ``test_amx.py`` (vLLM's
default multiprocess engine); here the choice itself, on vLLM's real config.
"""

from __future__ import annotations

import pytest

OFFLOAD = {"additional_config": {"moe_offload": {"policy": "lru", "budget": "50%"}}}


def _backend(model, monkeypatch, **engine) -> str:
    from vllm.engine.arg_utils import EngineArgs
    from vllm.plugins import load_general_plugins

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")  # vLLM's default, under which the platform says mp
    load_general_plugins()
    return EngineArgs(model=str(model), **engine).create_engine_config().parallel_config.distributed_executor_backend


@pytest.mark.parametrize(
    "engine, expected",
    [
        ({}, "mp"),  # stock vLLM: its own layout, untouched
        (OFFLOAD, "uni"),  # offload on: the worker in the engine core
        ({**OFFLOAD, "distributed_executor_backend": "uni"}, "uni"),
        ({**OFFLOAD, "distributed_executor_backend": "mp"}, "mp"),  # asked for: kept
        ({**OFFLOAD, "tensor_parallel_size": 2}, "mp"),  # one worker process per rank
    ],
    ids=["stock", "offload", "offload-asked-uni", "offload-asked-mp", "offload-tp2"],
)
def test_offload_runs_a_single_rank_cpu_worker_in_the_engine_core(tiny_models, monkeypatch, engine, expected):
    assert _backend(tiny_models["mixtral"], monkeypatch, **engine) == expected


def test_a_vllm_without_the_fields_the_override_sets_is_refused_by_name():
    from types import SimpleNamespace

    from vllm_moe_offload.patches import PatchContractError
    from vllm_moe_offload.patches.cpu_executor import keep_uni_executor

    with pytest.raises(PatchContractError, match="ParallelConfig.distributed_executor_backend"):
        keep_uni_executor(SimpleNamespace(world_size=1), None)
