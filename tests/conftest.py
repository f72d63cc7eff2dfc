"""Shared fixtures: tiny models made locally, and running real vLLM engines in subprocesses.

Engine start-up dominates test time (about 25 s per engine in vLLM's default
multiprocess mode on 2 cores). So most tests ask :func:`run_engines` for a list
of jobs, which one subprocess runs back to back with vLLM's engine in-process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``: about 2 s per engine). Stock vLLM runs in
its own subprocess with the plugin disabled but for its AMX permission
(``VLLM_PLUGINS=moe_offload_amx``: with ``none`` its workers die with SIGILL on AMX
CPUs, see vllm_moe_offload/runtime/amx.py). Each user-facing path also runs in vLLM's
default multiprocess mode, as users run it: each architecture but deepseek_v2 once in test_equality.py,
the servers (test_server.py, test_soak.py), TP=2 (test_tp.py) and test_amx.py.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from vllm_moe_offload.runtime.amx import STOCK_VLLM_PLUGINS



def _bind_xdist_worker() -> None:
    """Give each pytest-xdist worker its own cores (scripts/test.sh runs two workers).

    Set before anything imports torch or vLLM, and inherited by every engine a
    worker starts: vLLM's CPU worker binds its OpenMP threads to
    ``VLLM_CPU_OMP_THREADS_BIND``, so two workers' engines compute side by side
    instead of four OpenMP threads spinning on two cores. An engine and the
    stock engine it is compared with run in the same worker, with the same
    threads. Tests that need other cores (TP=2) set the variable themselves.
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # "gw0", "gw1", ...
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker.startswith("gw") or count < 2 or "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        return
    cpus = sorted(os.sched_getaffinity(0))
    mine = cpus[int(worker[2:]) :: count] or cpus
    binding = {"VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, mine)), "OMP_NUM_THREADS": str(len(mine))}
    for name, value in binding.items():
        if name not in os.environ:
            os.environ[name] = value
            XDIST_BINDING.append(name)


#: the variables :func:`_bind_xdist_worker` set in this process (see the ``vllm_default_binding`` fixture)
XDIST_BINDING: list[str] = []
_bind_xdist_worker()

REPO = Path(__file__).resolve().parents[1]
#: the trained demo MoE shipped in the repository (learned routing; held-out ids in its heldout-tokens.npy)
TINY_PYMOE = REPO / "models" / "tiny-pymoe"

#: prompts as token ids (the tiny models' byte tokenizer: <s> then bytes)
PROMPTS = [
    [1, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100],
    [1, 84, 104, 101, 32, 99, 97, 116],
    [1, 100, 101, 102, 32, 102, 40, 120, 41, 58],
    [1, 79, 110, 99, 101, 32, 117, 112, 111, 110, 32, 97, 32, 116, 105, 109, 101],
]


@pytest.fixture(scope="module")
def vllm_default_binding():
    """Engines with vLLM's own OpenMP binding (``auto``) instead of the xdist worker's cores.

    For tests whose subject is what happens under vLLM's defaults (test_amx.py:
    with the worker's binding, stock vLLM's worker did not die there).
    """
    with pytest.MonkeyPatch.context() as patch:
        for name in XDIST_BINDING:
            patch.delenv(name, raising=False)
        yield


def short_rpc_dir() -> Path:
    """A new folder for vLLM's IPC sockets, on a short path.

    A socket's path must fit 107 bytes (``sun_path``), and the folder names of
    pytest's ``tmp_path`` (longer under xdist: ``popen-gw0/``) plus vLLM's
    36-character socket names do not always fit. Under ``VLLM_RPC_BASE_PATH``
    when set (scripts/test.sh points it at its scratch folder, removed at the
    end), else the system's temporary folder.
    """
    return Path(tempfile.mkdtemp(prefix="rpc", dir=os.environ.get("VLLM_RPC_BASE_PATH") or None))


def engine_env(tmp: Path, stock: bool, multiprocess: bool = False) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        VLLM_RPC_BASE_PATH=str(short_rpc_dir()),
        VLLM_CACHE_ROOT=str(tmp / "vllm-cache"),
        VLLM_ENABLE_V1_MULTIPROCESSING="1" if multiprocess else "0",
        TOKENIZERS_PARALLELISM="false",
    )
    if stock:
        env["VLLM_PLUGINS"] = STOCK_VLLM_PLUGINS
    else:
        env.pop("VLLM_PLUGINS", None)
    return env


def run_engines(
    tmp: Path, jobs: list[dict], stock: bool, multiprocess: bool = False, timeout_s: int = 900,
    env: dict[str, str] | None = None, cgroup=None,
) -> dict:
    """Run ``jobs`` (see tests/run_engines.py) in one subprocess; results by job name.

    ``env``: variables set on top of :func:`engine_env`'s (it wins over them).
    ``cgroup``: a ``vllm_moe_offload.cli.cgroup.MemoryCgroup`` the subprocess (and the engine's) runs in.
    """
    tmp.mkdir(parents=True, exist_ok=True)
    jobs_file, out_file, log_file = tmp / "jobs.json", tmp / "out.json", tmp / "log.txt"
    jobs_file.write_text(json.dumps(jobs))
    with open(log_file, "w") as log:
        proc = subprocess.run(
            [sys.executable, str(REPO / "tests" / "run_engines.py"), str(jobs_file), str(out_file)],
            env={**engine_env(tmp, stock, multiprocess), **(env or {})}, stdout=log, stderr=subprocess.STDOUT,
            timeout=timeout_s, cwd=tmp, preexec_fn=cgroup.enter if cgroup is not None else None,
        )
    if proc.returncode != 0:
        raise AssertionError(f"engine runner failed ({proc.returncode}):\n{log_file.read_text()[-6000:]}")
    results = {r["name"]: r for r in json.loads(out_file.read_text())}
    for r in results.values():
        r["log"] = str(log_file)
    return results


def offload_job(name: str, model, max_tokens: int = 24, **offload) -> dict:
    """A ``run_engines`` job: PROMPTS greedily on ``model`` with ``moe_offload`` settings (none: stock)."""
    engine = {"additional_config": {"moe_offload": offload}} if offload else {}
    return {"name": name, "model": str(model), "engine": engine, "prompts": PROMPTS, "max_tokens": max_tokens}


def offload_total(result: dict) -> dict:
    """A ``run_engines`` result's summed offload stats (first rank); the run must not have failed."""
    assert "error" not in result, result.get("error")
    return result["stats"][0]["total"]


def round_tokens(result: dict) -> list:
    """A ``run_engines`` result's tokens, round by round."""
    return [r["tokens"] for r in result["rounds"]]


def split_round(result: dict, stock_tokens: list, reference: str = "stock") -> tuple[list[int], list[int]]:
    """(succeeded, failed) prompt indices of a round with faults; a success must equal ``stock_tokens``."""
    ok, failed = [], []
    for i, (tokens, reason) in enumerate(zip(result["tokens"], result["finish_reasons"])):
        if reason == "error":
            assert tokens == [], f"prompt {i} failed but streamed tokens {tokens}"
            failed.append(i)
        else:
            assert tokens == stock_tokens[i], f"prompt {i} succeeded with other tokens than {reference}"
            ok.append(i)
    return ok, failed


def use_expert(slots, expert: int) -> None:
    """One pass's need of ``expert`` in a ``SlotMap``: a hit, or a miss that is admitted."""
    if slots.slot_of(expert) is None:
        slots.admit(expert, pinned={expert})
        slots.touch(expert, hit=False)
    else:
        slots.touch(expert, hit=True)


@pytest.fixture(autouse=True)
def _vllm_logs_reach_caplog(request):
    """Let ``caplog`` see the plugin's records in any test order.

    Once an engine ran in the test process, vLLM's logging config has set
    ``propagate=False`` on the "vllm" logger, so records under it never reach
    the root logger that ``caplog`` listens on.
    """
    if "caplog" not in request.fixturenames:
        yield
        return
    handler = request.getfixturevalue("caplog").handler
    vllm_logger = logging.getLogger("vllm")
    vllm_logger.addHandler(handler)
    try:
        yield
    finally:
        vllm_logger.removeHandler(handler)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Random-weight tiny checkpoints of each supported architecture (made once per session)."""
    from vllm_moe_offload.cli.tiny_models import ARCHITECTURES, make_tiny_model

    root = tmp_path_factory.mktemp("models")
    return {arch: make_tiny_model(arch, root / arch) for arch in ARCHITECTURES}


@pytest.fixture(scope="session", autouse=True)
def _shared_modelinfo_cache(tmp_path_factory):
    """One folder of vLLM's model-info cache for every engine runner of the session.

    Without it each :func:`run_engines` call inspects each architecture again in
    a fresh Python process (6-20 s a time here); see tests/run_engines.py.
    """
    from tests.run_engines import SHARED_MODELINFO_ENV

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(SHARED_MODELINFO_ENV, str(tmp_path_factory.mktemp("modelinfos")))
        yield
