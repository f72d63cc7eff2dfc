"""vLLM's default multiprocess engine on AMX CPUs: without the plugin its worker dies with SIGILL, with it it answers.

The model has the shape the crash was reported on: a tiny Qwen3-MoE (hidden 128,
4 heads of 32, 5 layers, 12 experts, top-3, moe_intermediate 64, bf16). Since
Linux 5.16 a process must ask for AMX tile state before its first tile
instruction; vLLM 0.32's own AMX kernels never ask, while oneDNN asks for
itself when it picks an AMX kernel. So a worker dies on its first forward pass
when one of vLLM's kernels runs before oneDNN's first AMX kernel, which depends
on the machine: the reporter's workers died in 3 of 3 runs, on the machine these
tests were written on in 0 of 3. Every engine here runs with oneDNN kept off
AMX (``ONEDNN_MAX_CPU_ISA``), so that nothing asks before vLLM's kernels: then
the crash is certain without the permission on every AMX machine. The reference,
stock vLLM in-process, runs under the same setting, so tokens compare like for
like.
"""

from __future__ import annotations

import pytest

from tests.conftest import PROMPTS, run_engines
from tests.server_utils import serve
from vllm_moe_offload.runtime.amx import cpu_reports_amx

pytestmark = [pytest.mark.slow, pytest.mark.engine]

#: oneDNN's newest ISA below AMX: it then never asks Linux for AMX, and vLLM's kernels meet the bare process
NO_ONEDNN_AMX = {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}
MAX_TOKENS = 12
OFFLOAD = {"policy": "fate", "budget": "50%"}


def _job(name, model, offload=None):
    engine = {"additional_config": {"moe_offload": offload}} if offload else {}
    return {"name": name, "model": str(model), "engine": engine, "prompts": PROMPTS, "max_tokens": MAX_TOKENS}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from vllm_moe_offload.cli.tiny_models import make_tiny_model

    return make_tiny_model(
        "qwen3_moe", tmp_path_factory.mktemp("models") / "qwen3-moe-amx",
        num_hidden_layers=5, num_experts=12, num_experts_per_tok=3, moe_intermediate_size=64,
    )


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory, vllm_default_binding) -> list[list[int]]:
    """Stock vLLM in-process (the engine shares the test runner's process).

    Every engine of this module runs with vLLM's default OpenMP binding, as users run
    it (``vllm_default_binding``: every test here asks for this fixture first).
    """
    result = run_engines(tmp_path_factory.mktemp("inprocess"), [_job("stock", model)], stock=True,
                         env=NO_ONEDNN_AMX)["stock"]
    assert "error" not in result, result.get("error")
    return result["tokens"]


def test_stock_vllm_worker_dies_with_sigill_without_the_permission(model, reference, tmp_path):
    """The bug as users met it: ``VLLM_PLUGINS=none`` is vLLM with nothing of the plugin, AMX permission included."""
    # faulthandler names the signal in the log (vLLM reports the worker's exit code as -4, or None when it
    # looks before the process is reaped)
    env = {**NO_ONEDNN_AMX, "VLLM_PLUGINS": "none", "PYTHONFAULTHANDLER": "1"}
    if not cpu_reports_amx():
        print("this CPU reports no AMX (no amx_tile in /proc/cpuinfo): the SIGILL cannot be shown here; "
              "stock vLLM in multiprocess mode must simply answer")
        result = run_engines(tmp_path, [_job("stock", model)], stock=True, multiprocess=True, env=env)["stock"]
        assert result["tokens"] == reference
        return
    with pytest.raises(AssertionError, match=r"engine runner failed"):
        run_engines(tmp_path, [_job("stock", model)], stock=True, multiprocess=True, env=env, timeout_s=300)
    log = (tmp_path / "log.txt").read_text()
    assert "Worker proc VllmWorker-0 died unexpectedly" in log, log[-4000:]
    assert "Fatal Python error: Illegal instruction" in log, log[-4000:]
    print("reproduced: stock vLLM's worker died with SIGILL (exit code -4) on its first forward pass")


def test_llm_multiprocess_with_and_without_offload_matches_in_process_stock(model, reference, tmp_path):
    # only the plugin's main entry point (not moe_offload_amx beside it): its register() asks for AMX itself
    # fate: the worker runs in the engine-core process (the plugin's layout, patches/cpu_executor.py);
    # fate-mp: in a process of its own, as vLLM lays a CPU engine out, when the user asks for it
    fate_mp = _job("fate-mp", model, OFFLOAD)
    fate_mp["engine"]["distributed_executor_backend"] = "mp"
    jobs = [_job("off", model), _job("fate", model, OFFLOAD), fate_mp]
    for job in jobs:
        job["report_threads"] = True
    results = run_engines(
        tmp_path, jobs, stock=False, multiprocess=True, timeout_s=400,
        env={**NO_ONEDNN_AMX, "VLLM_PLUGINS": "moe_offload", "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"},
    )
    for name in ("off", "fate", "fate-mp"):
        assert "error" not in results[name], results[name].get("error")
        assert results[name]["tokens"] == reference, name
    assert results["off"]["stats"] is None  # offload off: vLLM's own worker, which has no offload statistics
    for name in ("fate", "fate-mp"):
        stats = results[name]["stats"][0]
        assert stats["policy"] == "fate" and stats["total"]["misses"] > 0  # really offloaded: 6 of 12 slots
    # the engine core running the worker computes with as many threads as vLLM's own worker process (without
    # the plugin setting OMP_NUM_THREADS it took every core, and tokens of longer decodes parted from stock's)
    assert results["fate"]["torch_threads"] == results["fate-mp"]["torch_threads"] == results["off"]["torch_threads"]
    ready = [line.split(")")[0] for line in open(results["fate"]["log"]) if "MoE offload ready" in line]
    assert [who.split()[0] for who in ready] == ["(EngineCore", "(Worker"], ready


@pytest.mark.parametrize("flags", [(), ("--moe-offload", "fate", "--moe-offload-budget", "50%")],
                         ids=["no-offload", "fate-50%"])
def test_vllm_serve_answers_like_in_process_stock(model, reference, tmp_path, flags):
    import openai

    with serve(model, tmp_path, flags, env=NO_ONEDNN_AMX) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)
        for prompt, expected in zip(PROMPTS, reference):
            done = client.completions.create(
                model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0,
                extra_body={"ignore_eos": True, "return_token_ids": True},
            )
            assert done.choices[0].token_ids == expected
        log = server.log.read_text()
    assert ("MoE offload ready" in log) == bool(flags)
