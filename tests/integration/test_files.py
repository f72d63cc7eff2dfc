"""The plugin writes nothing outside its configured cache directory.

Real engines on a copy of the tiny Mixtral, each run in a fresh sandbox: HOME,
TMPDIR, XDG_CACHE_HOME, XDG_CONFIG_HOME and VLLM_CACHE_ROOT point into it and
the runner's working directory is in it. The offload run (an int4 store under
``cache_dir``, then the plain disk tier) may write, outside ``cache_dir``, only
what stock vLLM (``VLLM_PLUGINS=moe_offload_amx``) writes in the same layout: vLLM's own
caches and the test runner's files. Nothing may appear in the model folder (for
example a store next to the checkpoint).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from tests.conftest import run_engines

pytestmark = pytest.mark.engine

PROMPTS = [[1, 72, 101, 108, 108, 111], [1, 84, 104, 101, 32, 99, 97, 116]]


def _job(name, model, **offload):
    engine = {"additional_config": {"moe_offload": {"policy": "lru", "budget": "50%", **offload}}} if offload else {}
    return {"name": name, "model": str(model), "engine": engine, "prompts": PROMPTS, "max_tokens": 4}


def _sandbox_env(sandbox: Path) -> dict[str, str]:
    env = {
        "HOME": "home", "TMPDIR": "tmp", "XDG_CACHE_HOME": "xdg-cache", "XDG_CONFIG_HOME": "xdg-config",
        "VLLM_CACHE_ROOT": "vllm-cache",
    }
    for name, folder in env.items():
        (sandbox / folder).mkdir(parents=True)
        env[name] = str(sandbox / folder)
    return env


def _snapshot(*roots: Path) -> dict[str, tuple]:
    """{path: (size, mtime_ns)} of every file and {path: ("dir",)} of every folder under ``roots``."""
    out: dict[str, tuple] = {}
    for root in roots:
        for folder, dirs, files in os.walk(root):
            for name in dirs:
                out[os.path.join(folder, name)] = ("dir",)
            for name in files:
                path = os.path.join(folder, name)
                if os.path.islink(path):
                    continue
                stat = os.stat(path)
                out[path] = (stat.st_size, stat.st_mtime_ns)
    return out


def _written(before: dict, after: dict, sandbox: Path, model: Path) -> set[str]:
    """Paths created or changed, relative to the sandbox ("model/..." in the model folder), with the
    parts that differ from run to run (process ids, random suffixes, hashes) replaced by ``#``."""
    changed = set()
    for path, stamp in after.items():
        if before.get(path) == stamp:
            continue
        if path.startswith(str(model)):
            changed.add("model/" + os.path.relpath(path, model))
        else:
            changed.add(os.path.relpath(path, sandbox))
    return {re.sub(r"[0-9a-f]{8,}|\d+|tmp\w{6,8}", "#", path) for path in changed}


def _run(tmp: Path, model: Path, jobs: list[dict], stock: bool) -> tuple[set[str], Path, dict]:
    sandbox = tmp / "sandbox"
    env = _sandbox_env(sandbox)
    before = _snapshot(sandbox, model)
    results = run_engines(sandbox / "cwd", jobs, stock=stock, env=env)
    return _written(before, _snapshot(sandbox, model), sandbox, model), sandbox, results


def test_offload_writes_only_under_its_cache_dir_and_what_stock_writes(tiny_models, tmp_path, monkeypatch):
    # importing torch's inductor in this process set it to a folder outside the sandbox
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    model = tmp_path / "model"
    shutil.copytree(tiny_models["mixtral"], model)
    stock_written, _, stock = _run(tmp_path / "stock", model, [_job("stock", model)], stock=True)
    cache_dir = tmp_path / "offload" / "sandbox" / "offload-cache"  # in the sandbox: its writes are seen
    jobs = [_job("int4", model, quant="int4", cache_dir=str(cache_dir)), _job("disk", model, tier="disk")]
    written, sandbox, offload = _run(tmp_path / "offload", model, jobs, stock=False)
    for name in ("int4", "disk"):
        assert "error" not in offload[name], offload[name].get("error")
        assert offload[name]["stats"][0]["total"]["misses"] > 0  # it really offloaded
    assert offload["int4"]["stats"][0]["total"]["bytes_read"].get("quant", 0) > 0  # read from its store
    assert offload["disk"]["tokens"] == stock["stock"]["tokens"]
    # the store: under cache_dir, named after the checkpoint
    stores = [p for p in cache_dir.iterdir() if p.is_dir()]
    assert len(stores) == 1 and stores[0].name.startswith("model-") and any(stores[0].rglob("*"))
    cache_prefix = os.path.relpath(cache_dir, sandbox)
    outside = {p for p in written if p != cache_prefix and not p.startswith(cache_prefix + os.sep)}
    assert not {p for p in outside if p.startswith("model/")}, "the model folder must stay untouched"
    assert outside <= stock_written, f"written outside cache_dir, unlike stock: {sorted(outside - stock_written)}"
