"""``--moe-offload-budget auto`` (the default) in real engines, with and without a memory limit.

Under a limit the engine runs in a memory cgroup of its own (page cache
counted, as on a real box), on the shipped tiny-pymoe padded to 3 MiB experts
(288 MiB in all). The limit is set from a first run's measured peak, so that
all experts would not fit besides the 512 MiB working margin ``auto`` keeps:
``auto`` must then offload, stay under the limit and keep stock's tokens.
Where the machine lets a test make no cgroup, that test is skipped with the reason.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vllm_moe_offload.cli.cgroup import MemoryCgroup
from tests.conftest import PROMPTS, TINY_PYMOE, run_engines
from vllm_moe_offload.cli.pad_model import pad_model
from vllm_moe_offload.core.memory_budget import WORKING_MIN_BYTES

pytestmark = [pytest.mark.slow, pytest.mark.engine]

MIB = 2**20
EXPERTS = 16


def _job(name, model, offload=None):
    engine = {"additional_config": {"moe_offload": offload}} if offload else {}
    return {"name": name, "model": str(model), "engine": engine, "prompts": PROMPTS, "max_tokens": 16}


def test_auto_keeps_every_expert_where_memory_allows(tmp_path):
    stock = run_engines(tmp_path / "stock", [_job("stock", TINY_PYMOE)], stock=True)["stock"]
    got = run_engines(tmp_path / "auto", [_job("auto", TINY_PYMOE, {"policy": "lru"})], stock=False)["auto"]
    assert got["tokens"] == stock["tokens"]
    stats = got["stats"][0]
    assert stats["layer_slots"] == [EXPERTS] * 6 and stats["total"]["misses"] == 0
    log = Path(got["log"]).read_text()
    assert "auto       budget auto = " in log and "KV cache 64.00 MiB (--kv-cache-memory-bytes)" in log


def _sized_by_the_plugin(tmp_path, max_num_seqs: int) -> str:
    """The log of an engine with ``max_num_seqs`` and no KV size set, after checking its tokens are stock's."""
    job = _job("sized", TINY_PYMOE, {"policy": "lru", "budget": "30%"})
    job["engine"].update(kv_cache_memory_bytes=None, max_num_seqs=max_num_seqs)
    stock = run_engines(tmp_path / "stock", [_job("stock", TINY_PYMOE)], stock=True)["stock"]
    got = run_engines(tmp_path / "sized", [job], stock=False)["sized"]
    assert "error" not in got, got.get("error")
    assert got["tokens"] == stock["tokens"]
    return Path(got["log"]).read_text()


def test_without_a_kv_size_the_plugin_sizes_it_and_counts_it_once(tmp_path):
    # no --kv-cache-memory-bytes: vLLM's CPU default would ask for 90% of the machine's memory
    log = _sized_by_the_plugin(tmp_path, max_num_seqs=4)
    # 4 sequences x 512 tokens (4 blocks of 128) x 1.5 KiB (6 layers x K,V x 2 heads x 32 x bf16), and the
    # block vLLM holds back: 17 blocks of 192 KiB
    assert "kv cache   3.19 MiB (sized by the plugin: max_num_seqs 4 x max_model_len 512 x 1.50 KiB per token" in log
    assert "Explicitly set (0.0/" in log  # vLLM's CPU worker took that size as given


def test_one_sequence_gets_its_blocks_and_the_one_vllm_holds_back(tmp_path):
    # `vllm serve --max-num-seqs 1`: a KV cache of exactly one request's blocks left vLLM none once its block
    # pool held one back ("No available memory for the cache blocks"), and the engine did not start
    log = _sized_by_the_plugin(tmp_path, max_num_seqs=1)
    # 4 blocks of 128 tokens x 1.5 KiB for one request of 512, and the block vLLM holds back
    assert "kv cache   960.00 KiB (sized by the plugin: max_num_seqs 1 x max_model_len 512" in log


@pytest.fixture(scope="module")
def padded(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("models") / "pymoe-x64"
    pad_model(TINY_PYMOE, out, 64, progress=False)  # 48 KiB -> 3 MiB experts
    return out


def test_auto_offloads_under_a_memory_limit_with_stock_tokens(padded, tmp_path):
    # a first run at 25% measures what the engine holds besides most of the experts
    probe = MemoryCgroup.make(16 * 2**30)
    if probe is None:
        pytest.skip(MemoryCgroup.CANNOT)
    try:
        stock = run_engines(tmp_path / "stock", [_job("stock", padded)], stock=True)["stock"]
        run_engines(tmp_path / "probe", [_job("probe", padded, {"policy": "lru", "budget": "25%"})],
                    stock=False, cgroup=probe)
        probe_peak = probe.peak_bytes()
    finally:
        probe.remove()
    # room for the working margin and about 160 MiB more: more than the minimum (2 of 16 experts per
    # layer, 48 MiB with staging), less than all 288 MiB of experts
    limit = probe_peak + WORKING_MIN_BYTES + 160 * MIB
    box = MemoryCgroup.make(limit)
    try:
        got = run_engines(tmp_path / "limited", [_job("auto", padded, {"policy": "lru"})], stock=False,
                          cgroup=box)["auto"]
        peak, oom_kills = box.peak_bytes(), box.oom_kills()
    finally:
        box.remove()
    log = Path(got["log"]).read_text()
    print(f"probe peak {probe_peak / MIB:.0f} MiB, limit {limit / MIB:.0f} MiB, peak under it {peak / MIB:.0f} MiB; "
          + next(line for line in log.splitlines() if "budget auto = " in line).split("MoE offload: ")[-1])
    assert "error" not in got, got.get("error")
    assert got["tokens"] == stock["tokens"]
    slots = got["stats"][0]["layer_slots"]
    assert all(2 <= n < EXPERTS for n in slots), slots  # offloaded, by the limit's arithmetic
    assert "(cgroup v" in log
    assert peak <= limit and oom_kills == 0
    assert "  processes  " not in log  # one process here (the tests' in-process engine): nothing to get back


def test_the_plan_says_what_the_other_processes_took_from_the_experts():
    from vllm_moe_offload.core.memory_budget import MemoryView, choose_auto_budget
    from vllm_moe_offload.integration.startup_plan import processes_hint

    view = MemoryView(2500 * MIB, "cgroup v1 limit 4.50 GiB less 2.00 GiB in use", in_use_bytes=2048 * MIB)
    auto = choose_auto_budget(view, kv_bytes=MIB, planned_at_bytes=1200 * MIB)
    (line,) = processes_hint(auto, "front end and engine core")
    assert line.startswith("  processes  vLLM's front end and engine core hold 848.00 MiB of the limit; ")
    assert "VLLM_ENABLE_V1_MULTIPROCESSING=0" in line
    (line,) = processes_hint(auto, "front end")  # the plugin's layout: the worker in the engine core
    assert line.startswith("  processes  vLLM's front end holds 848.00 MiB of the limit; ")
    assert processes_hint(auto, None) == []  # already one process
    small = choose_auto_budget(view, kv_bytes=MIB, planned_at_bytes=1900 * MIB)  # 148 MiB: not worth a line
    assert processes_hint(small, "front end") == [] and processes_hint(None, "front end") == []


def test_the_placeholders_give_their_memory_back_before_auto_measures():
    """vLLM's loader makes one placeholder expert per layer (integration/experts.py); auto must not count it.

    Each keeps its Parameter object (a quantized kernel's config holds it), its
    shape, dtype and device, from which the slot pools and converters are made;
    its storage becomes one element.
    """
    import torch

    from vllm_moe_offload.integration.quantized_experts import one_expert_bytes
    from vllm_moe_offload.integration.setup import _release_placeholders

    layer = torch.nn.Module()
    layer.expert_format = None
    layer.w13_weight = torch.nn.Parameter(torch.ones(1, 256, 128, dtype=torch.bfloat16), requires_grad=False)
    layer.w2_weight = torch.nn.Parameter(torch.ones(1, 128, 128, dtype=torch.bfloat16), requires_grad=False)
    params, before = [layer.w13_weight, layer.w2_weight], one_expert_bytes(layer)
    _release_placeholders([layer])
    assert layer.w13_weight is params[0] and layer.w2_weight is params[1]  # the same objects
    assert [tuple(p.shape) for p in params] == [(1, 256, 128), (1, 128, 128)]
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in params)
    assert [p.untyped_storage().nbytes() for p in params] == [2, 2]  # was 64 KiB and 32 KiB
    assert one_expert_bytes(layer) == before == (256 + 128) * 128 * 2
