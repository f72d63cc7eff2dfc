"""scripts/gpu_check.py on CPU: the torch-only checks it runs on a GPU machine, exercised here for real."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from scripts.gpu_check import check_slots, make_experts, reference_moe

REPO = Path(__file__).resolve().parents[2]


def test_reference_moe_is_the_top_k_weighted_sum_of_swiglu_experts():
    w13, w2 = make_experts(4, hidden=8, inter=6, dtype=torch.float64, seed=0)
    x = torch.randn(3, 8, dtype=torch.float64)
    ids = torch.tensor([[0, 2], [3, 1], [2, 0]])
    weights = torch.rand(3, 2, dtype=torch.float64)
    out = reference_moe(x, w13, w2, weights, ids)
    for t in range(3):
        want = sum(
            weights[t, j] * (torch.nn.functional.silu(w13[e, :6] @ x[t]) * (w13[e, 6:] @ x[t])) @ w2[e].t()
            for j, e in enumerate(ids[t].tolist())
        )
        torch.testing.assert_close(out[t], want)


def test_slot_pools_over_remapped_ids_equal_all_resident_on_cpu():
    for pinned in (True, False):  # on CPU both are pageable; the flag only matters on a GPU
        got = check_slots(torch.device("cpu"), pinned, steps=8)
        assert got["mismatches"] == 0
        assert got["misses"] > 0 and got["hits"] > 0  # slots really evicted and reused
        assert got["passes"] > got["steps"]  # some steps needed more experts than slots


def test_a_wrong_slot_table_is_caught():
    """The equality check can fail: remapping with a shifted table gives other experts' outputs."""
    w13, w2 = make_experts(4, hidden=8, inter=6, dtype=torch.float32, seed=1)
    x, ids, weights = torch.randn(2, 8), torch.tensor([[0, 1], [2, 3]]), torch.rand(2, 2)
    assert not torch.equal(reference_moe(x, w13, w2, weights, ids), reference_moe(x, w13, w2, weights, (ids + 1) % 4))


def test_the_script_runs_on_cpu_and_prints_pass_skipped_and_a_json_summary(tmp_path):
    out = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--device", "cpu", "--quick",
         "--json", str(tmp_path / "summary.json")],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert any(line.startswith("PASS slots_pinned_source") for line in lines)
    assert any(line.startswith("PASS slots_pageable_source_staged") for line in lines)
    assert any(line.startswith("SKIPPED copy_compute_overlap: ") for line in lines)
    assert any(line.startswith("SKIPPED h2d_bandwidth: ") for line in lines)
    summary = json.loads(lines[lines.index("JSON SUMMARY") + 1])
    assert summary["result"] == "PASS"
    assert summary == json.loads((tmp_path / "summary.json").read_text())
