"""The examples run as documented (the client example runs against the test server in test_server.py)."""

from __future__ import annotations

import re
import runpy
import subprocess
import sys

import pytest

from tests.conftest import REPO, engine_env

pytestmark = pytest.mark.engine


def test_pick_budget_traces_simulates_and_names_a_budget(tiny_models, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Once upon a time\ndef fibonacci(n):\n")
    out = subprocess.run(
        [sys.executable, str(REPO / "examples" / "pick_budget.py"), str(tiny_models["mixtral"]),
         "--prompts", str(prompts), "--max-tokens", "8", "--target", "0.5", "--work", str(tmp_path / "work")],
        # vLLM's default multiprocess engine, as a user runs the demo
        env=engine_env(tmp_path, stock=False, multiprocess=True), capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert (tmp_path / "work" / "trace.npz").exists()
    rows = re.findall(r"^\s+(\d+)\s+([\d.]+)%\s+([\d.]+)$", out.stdout, re.MULTILINE)
    slots = [int(n) for n, _, _ in rows]
    assert slots == list(range(slots[0], 9)) and slots[0] <= 2  # from top_k (2) up to every expert (8)
    rates = [float(rate) for _, _, rate in rows]
    assert rates[-1] > rates[0]  # a slot for every expert misses only the first use of each
    chosen = re.search(r"serve with --moe-offload lru --moe-offload-budget ([\d.]+)%", out.stdout)
    assert chosen, out.stdout
    first_ok = next(i for i, rate in enumerate(rates) if rate >= 0.5)
    assert float(chosen.group(1)) == pytest.approx(100 * slots[first_ok] / 8)


def test_benchmark_example_is_valid_bash():
    out = subprocess.run(["bash", "-n", str(REPO / "examples" / "benchmark.sh")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_the_setup_demo_generates_with_offload(tmp_path):
    """``bash scripts/setup.sh --demo`` runs this example with no arguments: the shipped models/tiny-pymoe.

    From another folder than the repository's: the default model is found relative to the example.
    """
    example = REPO / "examples" / "offline_generate.py"
    out = subprocess.run(
        [sys.executable, str(example), "--max-tokens", "8"],
        # vLLM's default multiprocess engine, as a user runs the demo
        env=engine_env(tmp_path, stock=False, multiprocess=True), capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    prompts = runpy.run_path(str(example))["PROMPTS"]
    for i, prompt in enumerate(prompts, 1):
        # the prompt as text (not a repr), then its continuation under its own header
        assert f"----- prompt {i} -----\n{prompt}\n----- continuation (8 tokens) -----\n" in out.stdout, out.stdout
    # the default budget, 50%, is 8 of tiny-pymoe's 16 experts in each of its 6 MoE layers
    summary = re.search(r"^expert cache \(lru, 8/16 experts per layer, disk tier\): 6 layers, hit rate ([\d.]+) "
                        r"\((\d+) hits, (\d+) misses\)", out.stdout, re.MULTILINE)
    assert summary, out.stdout
    assert int(summary.group(3)) > 0  # half the experts are offloaded: the first uses miss
