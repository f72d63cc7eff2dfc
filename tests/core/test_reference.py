"""The simulator's default view reproduces ../shared/traces/README.md's reference table.

Three choices make it match exactly (to the table's 3 decimals), and are the defaults:

* one cache per sequence, starting empty (``mode="per-sequence"``);
* each sequence's rows in position order, one row per step. The Qwen file logs one
  ``req_id`` for all rows, so its 4,357 rows are ordered by ``pos`` as one sequence
  (``pos`` restarts 128 times: these are really 129 forward batches; ``--shared``
  replays them as such);
* LRU served expert by expert in gate order, where an expert the token needs but has
  not used yet may be evicted (``order="sequential"``). With the step's experts pinned
  (``order="step"``) LRU at 2 of 8 slots equals Belady (0.395, not 0.341): both must
  hold exactly the token's two experts.

Belady (the step's experts pinned, farthest next use leaves) is the same in both orders.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vllm_moe_offload.core.simulate import simulate
from vllm_moe_offload.core.traces import load_trace

SHARED_TRACES = Path(__file__).resolve().parents[2].parent / "shared" / "traces"

REFERENCE = {  # file: {slots: (LRU hit, Belady hit)}
    "mixtral-8x7b-humaneval-decode.jsonl": {2: (0.341, 0.395), 4: (0.599, 0.746), 6: (0.803, 0.898)},
    "mixtral-8x7b-gsm8k-decode.jsonl": {2: (0.285, 0.342), 4: (0.572, 0.727)},
    "qwen1.5-moe-a2.7b-5layers.jsonl": {18: (0.356, 0.641), 32: (0.602, 0.834)},
}


def _trace(name: str):
    path = SHARED_TRACES / name
    if not path.exists():
        pytest.skip(f"{path} is absent")
    return load_trace(path)


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_default_mode_matches_the_reference_table(name):
    table = REFERENCE[name]
    report = simulate(_trace(name), sorted(table), ["lru", "belady"])
    for entry in report["results"]:
        lru, belady = table[entry["slots_per_layer"]]
        got = entry["policies"]
        assert round(got["lru"]["demand_hit_rate"], 3) == lru
        assert round(got["belady"]["demand_hit_rate"], 3) == belady


def test_pinning_the_step_does_not_reproduce_the_lru_column():
    report = simulate(_trace("mixtral-8x7b-humaneval-decode.jsonl"), [2], ["lru"], order="step")
    got = report["results"][0]["policies"]
    assert got["lru"]["demand_hit_rate"] == got["belady"]["demand_hit_rate"]
    assert round(got["lru"]["demand_hit_rate"], 3) == 0.395
