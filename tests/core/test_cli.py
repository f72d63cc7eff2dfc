"""``vllm-moe-offload simulate`` end to end on a tiny trace: JSON, PNG and the printed table."""

from __future__ import annotations

import json

from tests.core.tracegen import one_layer
from vllm_moe_offload.cli.main import main
from vllm_moe_offload.core.traces import save_trace

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_simulate_writes_json_png_and_a_table(tmp_path, capsys):
    trace = one_layer([0, 1], [2, 3], [1, 2], [0, 3], [1, 0], num_experts=4)
    path = save_trace(trace, tmp_path / "tiny.npz")
    out = tmp_path / "out"
    rc = main([
        "simulate", str(path), "--budgets", "25%,2,75%", "--policies", "lru,lfu,ondemand,eap,belady",
        "--out", str(out), "--no-progress", "--expert-bytes", "1MiB",
    ])
    assert rc == 0
    report = json.loads((out / "simulate.json").read_text())
    assert [e["slots_per_layer"] for e in report["results"]] == [2, 3]
    assert report["policies"] == ["lru", "lfu", "ondemand", "lru+eap", "belady"]
    assert report["expert_bytes"] == 2**20
    assert (out / "simulate.png").read_bytes()[:8] == PNG_MAGIC
    printed = capsys.readouterr().out
    assert "skipping budget 25%: 1 slot(s)" in printed
    assert "belady" in printed and "MiB" in printed and "simulate.png" in printed


def test_simulate_shared_mode_and_output_name(tmp_path):
    trace = one_layer([0, 1], [2, 3], num_experts=4)
    path = save_trace(trace, tmp_path / "tiny.npz")
    rc = main(["simulate", str(path), "--shared", "--order", "step", "--budgets", "3", "--out", str(tmp_path),
               "--name", "run", "--no-progress"])
    assert rc == 0
    report = json.loads((tmp_path / "run.json").read_text())
    assert (report["mode"], report["order"]) == ("shared", "step")
    assert (tmp_path / "run.png").read_bytes()[:8] == PNG_MAGIC


def test_simulate_reports_bad_arguments(tmp_path, capsys):
    path = save_trace(one_layer([0, 1], num_experts=4), tmp_path / "tiny.npz")
    assert main(["simulate", str(path), "--budgets", "1", "--no-progress", "--out", str(tmp_path)]) == 2
    assert main(["simulate", str(path), "--policies", "mru", "--no-progress", "--out", str(tmp_path)]) == 2
    printed = capsys.readouterr().out
    assert "fewer than top_k = 2" in printed and "unknown cache policy 'mru'" in printed
    assert not (tmp_path / "simulate.json").exists()
