"""``budget auto``: parsing, and the arithmetic that leaves the KV cache and a working margin their room."""

from __future__ import annotations

import pytest

from vllm_moe_offload.core.config import Budget, OffloadConfig
from vllm_moe_offload.core.memory_budget import (
    WORKING_MIN_BYTES,
    MemoryView,
    choose_auto_budget,
    kv_bytes_when_unset,
)

GIB = 2**30


@pytest.mark.parametrize("text", ["auto", " AUTO "])
def test_auto_parses_prints_and_is_the_default(text):
    budget = Budget.parse(text)
    assert budget.auto and str(budget) == "auto"
    assert OffloadConfig.from_dict({"policy": "lru"}).budget == Budget(auto=True)
    assert OffloadConfig.from_dict({"policy": "lru", "budget": text}).to_dict()["budget"] == "auto"
    with pytest.raises(ValueError, match="resolve it first"):
        budget.resolve(10**9)


def test_the_experts_get_what_the_kv_cache_and_the_margin_leave():
    auto = choose_auto_budget(MemoryView(10 * GIB, "cgroup"), kv_bytes=2 * GIB)
    assert auto.working_bytes == GIB  # 10% of what is available (above the floor)
    assert auto.budget_bytes == 10 * GIB - 2 * GIB - GIB
    text = auto.explain()
    assert "10.00 GiB available (cgroup)" in text and "KV cache 2.00 GiB" in text and "= 7.00 GiB" in text


def test_under_a_cgroup_the_other_processes_share_is_known():
    # the cgroup's usage counts every process of the engine; the worker knows what it holds itself
    view = MemoryView(2 * GIB, "cgroup v2 limit", in_use_bytes=3 * GIB)
    auto = choose_auto_budget(view, kv_bytes=0, planned_at_bytes=GIB + GIB // 4)
    assert auto.in_use_bytes == 3 * GIB and auto.other_processes_bytes == GIB * 3 // 4 + GIB
    # without a cgroup's usage (MemAvailable) or the worker's own, nothing is said
    assert choose_auto_budget(MemoryView(2 * GIB, "MemAvailable"), 0, planned_at_bytes=GIB).other_processes_bytes is None
    assert choose_auto_budget(view, kv_bytes=0).other_processes_bytes is None


def test_every_rank_keeps_its_kv_cache():
    auto = choose_auto_budget(MemoryView(10 * GIB, "MemAvailable"), kv_bytes=2 * GIB, tp_size=2)
    assert auto.budget_bytes == 10 * GIB - 2 * 2 * GIB - GIB
    assert "KV cache 2 x 2.00 GiB" in auto.explain()


def test_the_margin_has_a_floor_and_nothing_left_is_zero_not_negative():
    small = choose_auto_budget(MemoryView(GIB, "x"), kv_bytes=0)
    assert small.working_bytes == WORKING_MIN_BYTES and small.budget_bytes == GIB - WORKING_MIN_BYTES
    assert choose_auto_budget(MemoryView(GIB, "x"), kv_bytes=GIB).budget_bytes == 0
    assert choose_auto_budget(MemoryView(-5, "x"), kv_bytes=0).budget_bytes == 0


def test_without_an_explicit_kv_size_the_kv_cache_keeps_half_the_room_vllm_requested():
    assert kv_bytes_when_unset(requested_bytes=10 * GIB, resident_bytes=2 * GIB) == 4 * GIB
    assert kv_bytes_when_unset(requested_bytes=GIB, resident_bytes=2 * GIB) == 0


def test_the_plugins_kv_cache_holds_every_sequence_at_full_length_within_its_share():
    from vllm_moe_offload.core.memory_budget import KV_MAX_SHARE, size_kv_cache

    roomy = MemoryView(100 * GIB, "MemAvailable")
    # 1536 bytes a token (tiny-pymoe: 6 layers x K,V x 2 heads x 32 x bf16); 145 tokens take 2 blocks of 128,
    # and vLLM's block pool holds one block back (its null block): without it vLLM refuses to start
    every = size_kv_cache(1536, 128, 145, 4, roomy)
    assert every.kv_bytes == (4 * 256 + 128) * 1536 and "sized by the plugin: max_num_seqs 4 x max_model_len 145" in every.why
    one = size_kv_cache(1536, 128, 64, 1, roomy)  # `vllm serve --max-num-seqs 1 --max-model-len 64`
    assert one.kv_bytes == 2 * 128 * 1536 and "the block vLLM holds back" in one.why
    # the share caps it: 256 sequences of 32768 tokens at 128 KiB a token would be 1 TiB
    capped = size_kv_cache(128 * 1024, 128, 32768, 256, MemoryView(100 * GIB, "cgroup v2"))
    assert capped.kv_bytes == int(KV_MAX_SHARE * 100 * GIB) and capped.kv_bytes // (4 * GIB) == 2
    assert "10% of 100.00 GiB available (cgroup v2), for 2 of max_num_seqs 256 full-length requests" in capped.why
    # never below one request of max_model_len: vLLM would not start
    tight = size_kv_cache(128 * 1024, 128, 32768, 256, MemoryView(GIB, "cgroup v2"))
    assert tight.kv_bytes == (32768 + 128) * 128 * 1024 and "one request of max_model_len 32768" in tight.why
    with pytest.raises(ValueError, match="bad KV geometry"):
        size_kv_cache(0, 128, 145, 4, roomy)
