"""``bench --memory-limit``: the flag refused where wrong, a command run in a memory cgroup, the report of a killed run.

No engine starts here: ``run_limited`` runs small Python commands (a process that
holds memory, one that holds more than its limit), and the report is rendered
from a hand-made result of the shape ``bench`` writes (stock OOM-killed, one
plugin run). Where the machine lets a test make no cgroup, that test is skipped
with the reason.
"""

from __future__ import annotations

import json
import sys

import pytest

from tests.conftest import TINY_PYMOE
from vllm_moe_offload.cli.bench_report import format_markdown, mark_token_equality
from vllm_moe_offload.cli.cgroup import MemoryCgroup, run_limited
from vllm_moe_offload.cli.main import main

MIB = 2**20
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

@pytest.fixture
def cgroup_allowed():
    probe = MemoryCgroup.make(64 * MIB)
    if probe is None:
        pytest.skip(MemoryCgroup.CANNOT)
    probe.remove()


def test_bench_refuses_bad_memory_limits(tmp_path, capsys):
    out = tmp_path / "out"
    for bad in ("lots", "50%", "auto", "4.5 lots"):
        assert main(["bench", str(TINY_PYMOE), "--memory-limit", bad, "--out", str(out)]) == 2
        assert f"--memory-limit {bad!r} is not a size; write one such as 4.5GiB" in capsys.readouterr().out
    assert main(["bench", str(TINY_PYMOE), "--memory-limit", "100MiB", "--out", str(out)]) == 2
    assert "--memory-limit '100MiB' is below 512 MiB" in capsys.readouterr().out
    assert not out.exists()


def test_bench_says_why_where_no_cgroup_can_be_made(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(MemoryCgroup, "make", classmethod(lambda cls, limit_bytes: None))
    assert main(["bench", str(TINY_PYMOE), "--memory-limit", "4GiB", "--out", str(tmp_path / "out")]) == 2
    assert "--memory-limit needs a memory cgroup, and no memory cgroup can be made here" in capsys.readouterr().out


def _holder(hold_mib: int, exit_code: int = 0) -> list[str]:
    """A process whose child holds ``hold_mib`` MiB for 2 s, then exits with ``exit_code``."""
    child = ("import sys, time; b = bytearray(int(sys.argv[1]) * 2**20); b[::4096] = b'x' * len(b[::4096]); "
             "time.sleep(2.0)")
    parent = (f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}, '{hold_mib}'], check=True); "
              f"sys.exit({exit_code})")
    return [sys.executable, "-c", parent]


def test_run_limited_measures_every_process_and_says_how_it_ended(cgroup_allowed):
    ran = run_limited(_holder(200), 1024 * MIB, timeout_s=60)
    assert ran.ended == "ran" and ran.exit_code == 0 and ran.oom_kills == 0
    assert 200 * MIB <= ran.peak_bytes <= 1024 * MIB
    assert len(ran.processes) == 2  # processes, not threads
    assert max(p["RssAnon"] for p in ran.processes) >= 200 * MIB
    assert ran.as_dict()["peak_memory_bytes"] == ran.peak_bytes
    assert ran.pressure["major_faults"] >= 0 and ran.pressure["limit_hits"] == 0  # 1 GiB: never met

    assert run_limited(_holder(10, exit_code=3), 1024 * MIB, timeout_s=60).ended == "exit code 3"

    killed = run_limited(_holder(600), 256 * MIB, timeout_s=60)
    assert killed.oom_kills >= 1 and killed.ended.startswith("OOM-killed") and killed.exit_code != 0
    assert killed.peak_bytes <= 256 * MIB
    assert killed.pressure["limit_hits"] >= 1  # it met the limit before the kill

    slow = run_limited([sys.executable, "-c", "import time; time.sleep(60)"], None, timeout_s=1)
    assert slow.ended == "timed out" and slow.exit_code is None and slow.limit_bytes is None


def _report() -> dict:
    """What ``bench --memory-limit`` gathers: stock OOM-killed, one plugin run, the unlimited reference."""
    decode = {"workload": "decode", "requests": 1, "prompt_tokens": 8, "generated_tokens": 4, "wall_s": 2.0,
              "throughput_tok_s": 2.0, "total_tok_s": 6.0, "decode_tok_s": 2.5, "tpot_s": 0.4, "ttft_s": 0.5,
              "tokens": [[5, 6, 7, 8]],
              "offload": {"bytes_read": 8 * MIB, "demand_hit_rate": 0.5, "ready_rate": 0.5, "stall_s": 0.1}}
    cache = {"file_bytes": 9, "resident_bytes": 0, "expert_bytes": 100 * MIB, "expert_resident_bytes": 0}
    limit = {"memory_limit_bytes": 4 * 2**30, "exit_code": 0, "oom_kills": 0, "process_wall_s": 30.0,
             "major_faults": 1200, "limit_hits": 0}
    return {
        "model": "/m/pymoe-x2048", "quick": False, "link": "none", "policies": ["lru"], "budgets": ["auto"],
        "sizes": {"decode_prompt": 8, "decode_tokens": 4, "prefill_tokens": 8, "batch_requests": 2,
                  "batch_prompt": 4, "batch_tokens": 2},
        "model_info": {"config": {"num_hidden_layers": 6, "hidden_size": 128, "intermediate_size": 131072,
                                  "num_local_experts": 16, "num_experts_per_tok": 2}, "padding": None},
        "machine": {"cpus": 2, "platform": "linux", "load_avg_at_start": [1.0], "load_avg_at_end": [1.0],
                    "note": "test", "source": {}},
        "memory_limit_bytes": 4 * 2**30,
        "reference": {"name": "stock, no limit (routing)", "ended": "ran", "peak_memory_bytes": 12 * 2**30,
                      "startup_s": 80.0, "decode_tok_s": 9.0, "tokens": {"decode": [[5, 6, 7, 8]]}},
        "runs": [
            {"name": "stock", "kind": "stock", "workloads": {}, "offload": None, "policy": None, "budget": None,
             **limit, "exit_code": -9, "oom_kills": 1, "ended": "OOM-killed (1 kill(s), exit code -9)",
             "peak_memory_bytes": 4 * 2**30, "processes": []},
            {"name": "lru auto", "kind": "offload", "policy": "lru", "budget": "auto", "startup_s": 30.0,
             "workloads": {"decode": decode}, "offload": {"slot_bytes": 2 * 2**30, "budget_bytes": 2 * 2**30,
                                                         "layer_slots": [3] * 6, "num_experts": 16,
                                                         "expert_bytes": 96 * MIB},
             "offload_total": {"layers": 6, "bytes_read": {"disk": 8 * MIB}, "stall_s": 0.1},
             "page_cache_before": cache, "page_cache_after": cache,
             "memory_kib": {"VmHWM": 1024, "AnonHugePages": 2048},
             **limit, "ended": "ran", "peak_memory_bytes": 3 * 2**30,
             "processes": [{"pid": 1, "name": "python: -m vllm_moe_offload.cli.bench_run", "VmRSS": 2**30,
                            "RssAnon": 2**29},
                           {"pid": 2, "name": "VLLM::EngineCor: x", "VmRSS": 2 * 2**30, "RssAnon": 2**30}]},
        ],
    }


def test_report_of_a_killed_stock_run(tmp_path):
    from vllm_moe_offload.cli.plots import plot_bench_memory, plot_bench_speed

    report = _report()
    mark_token_equality(report)
    assert report["runs"][1]["workloads"]["decode"]["tokens_match_stock"]  # against the unlimited reference
    assert "tokens" not in report["reference"]
    md = format_markdown(report)
    assert "## Under a memory limit of 4.00 GiB" in md
    assert "| stock | OOM-killed (1 kill(s), exit code -9) | 4.00 | 1200 | 0 | - | - | - | - |" in md
    # peak RSS 1 MiB, 2 MiB of it in huge pages (a diagnostic: runs of the same code may get different shares)
    assert "| lru auto | 3 | 2048.0 | 2048.0 | 9216.0 | 1 | 2 | 8.0 | 0.0 -> ? -> 0.0 | - | - |" in md
    assert ("| lru auto | ran | 3.00 | 1200 | 0 | 30.0 | 2.50 | 2.00 | front end (LLM) 1.00 (0.50); "
            "EngineCore 2.00 (1.00) |") in md
    assert "peaked at 12.00 GiB" in md
    for plot in (plot_bench_memory, plot_bench_speed):
        assert plot(report, tmp_path / "p.png").read_bytes()[:8] == PNG_MAGIC
    json.dumps(report)


def test_report_names_the_cpu_and_vllms_binding(monkeypatch):
    """A figure depends on the CPU (AMX or not) and on how vLLM bound its worker: the bench records both."""
    from vllm_moe_offload.cli.bench import machine_info

    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    assert machine_info()["cpu_binding"] == "auto"
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0-1")
    machine = machine_info()
    assert machine["cpu_binding"] == "0-1"
    report = _report()
    report["machine"].update(cpu_model=machine["cpu_model"], cpu_binding="0-1")
    md = format_markdown(report)
    assert "`VLLM_CPU_OMP_THREADS_BIND=0-1`" in md
    if machine["cpu_model"]:  # /proc/cpuinfo names it on Linux
        assert f"2 CPUs ({machine['cpu_model']})" in md
    report["machine"]["cpu_binding"] = "auto"
    assert "vLLM's default CPU binding" in format_markdown(report)
    del report["machine"]["cpu_binding"], report["machine"]["cpu_model"]  # a bench.json from before
    assert "Machine: 2 CPUs, linux; load average" in format_markdown(report)
