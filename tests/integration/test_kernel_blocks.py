"""``integration/kernel_blocks.pad_plan``: dummy rows that put each real row of a call on its step path."""

from __future__ import annotations

import pytest

from vllm_moe_offload.integration.kernel_blocks import BLOCK_M, SMALL_BLOCK, pad_plan, small_tail


def _blocks_ok(counts, plan, top_k):
    """Replays the kernel's blocking: dummies first, then the call's rows in token order, tail last."""
    extra = {}
    for row in plan:
        assert len(row) == top_k
        for e in row:
            extra[e] = extra.get(e, 0) + 1
    for e, (step, before, tail) in counts.items():
        d = extra.get(e, 0)
        rows = d + before + tail
        # the path of each real row in the call: its block's size
        for pos in range(d, rows):
            block = min(BLOCK_M, rows - pos // BLOCK_M * BLOCK_M)
            small_in_call = block <= SMALL_BLOCK
            in_tail = pos >= d + before
            small_in_step = step <= SMALL_BLOCK or (in_tail and small_tail(step) > 0)
            if small_in_call != small_in_step:
                return False
    return True


def test_small_tail():
    assert [small_tail(n) for n in (1, 4, 5, 32, 33, 36, 37, 64, 65)] == [1, 4, 0, 0, 1, 4, 0, 0, 1]


@pytest.mark.parametrize("top_k", [1, 2, 8])
@pytest.mark.parametrize("spare", [None, 99])
def test_every_real_row_keeps_its_path(top_k, spare):
    cases = [
        {0: (40, 3, 0)},  # large in the step, 3 rows in the call: pad to a large block
        {0: (40, 1, 0), 1: (6, 2, 0)},
        {0: (3, 2, 0), 1: (50, 31, 0)},  # a small expert can take fillers
        {0: (66, 10, 2)},  # a small tail: the 10 rows before it fill a whole block first
        {0: (66, 0, 2), 1: (8, 5, 0)},  # only tail rows: nothing to do for 0
        {0: (33, 32, 1)},
    ]
    for counts in cases:
        plan = pad_plan(counts, top_k, spare)
        if plan is None:  # allowed only when no filler exists
            assert spare is None
            continue
        assert _blocks_ok(counts, plan, top_k), (counts, plan)


def test_nothing_to_do_gives_no_rows():
    assert pad_plan({0: (2, 2, 0), 1: (40, 8, 0)}, 2, None) == []


def test_no_plan_without_a_filler():
    # expert 0 needs exactly 30 dummies before its tail (even), 1 needs 3 (odd): with top_k 2 one cell is
    # left, and neither can take it without changing a path
    assert pad_plan({0: (66, 2, 2), 1: (40, 2, 0)}, 2, None) is not None  # 1 can take one more
    assert pad_plan({0: (66, 2, 2), 1: (66, 3, 1)}, 2, None) is None
    assert pad_plan({0: (66, 2, 2), 1: (66, 3, 1)}, 2, 7) is not None
