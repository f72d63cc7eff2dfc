"""Starting ``vllm serve`` on 127.0.0.1 for tests and waiting for it (multiprocess engine: ~20-30 s)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import engine_env
from tests.run_engines import SHARED_MODELINFO_ENV, copy_modelinfos

VLLM = str(Path(sys.executable).parent / "vllm")

#: the flags every test server shares: small KV cache (skips automatic sizing), eager (fast start-up)
BASE_FLAGS = (
    "--dtype", "bfloat16", "--max-model-len", "512", "--kv-cache-memory-bytes", str(64 * 2**20),
    "--enforce-eager", "--served-model-name", "tiny",
)

#: the tiny models' tokenizer has no chat template: one line per message, then the answer
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"


@dataclass
class Server:
    url: str  # http://127.0.0.1:PORT
    log: Path
    process: subprocess.Popen

    @property
    def base_url(self) -> str:
        return self.url + "/v1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(port: int, server: subprocess.Popen, log: Path, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"server exited with {server.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"server not healthy after {timeout_s} s:\n{log.read_text()[-4000:]}")


def stop(server: subprocess.Popen) -> None:
    try:
        os.killpg(server.pid, signal.SIGTERM)
    except ProcessLookupError:  # the server and its children are gone already (wait_healthy says how)
        server.wait()
        return
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


@contextlib.contextmanager
def serve(
    model: Path, tmp: Path, flags: tuple[str, ...] = (), stock: bool = False, env: dict[str, str] | None = None,
) -> Iterator[Server]:
    """``vllm serve MODEL FLAGS`` (plus :data:`BASE_FLAGS`) until the block ends; its output goes to tmp/serve.log.

    ``env``: variables set on top of :func:`tests.conftest.engine_env`'s.
    """
    tmp.mkdir(parents=True, exist_ok=True)
    shared = os.environ.get(SHARED_MODELINFO_ENV)
    if shared:  # vLLM's model-info cache of the session (tests/run_engines.py): skips an inspection process
        copy_modelinfos(Path(shared), tmp / "vllm-cache" / "modelinfos")
    port = free_port()
    log_path = tmp / "serve.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [VLLM, "serve", str(model), *flags, "--host", "127.0.0.1", "--port", str(port), *BASE_FLAGS],
            env={**engine_env(tmp, stock=stock, multiprocess=True), **(env or {})}, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,  # the engine-core children die with the group
        )
        try:
            wait_healthy(port, process, log_path)
            yield Server(f"http://127.0.0.1:{port}", log_path, process)
        finally:
            stop(process)


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """The samples of ``url``/metrics by (name, sorted labels)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def total(samples: dict[tuple[str, tuple], float], name: str) -> float:
    """Sum of every sample called ``name`` (all label values)."""
    return sum(value for (sample, _), value in samples.items() if sample == name)
