"""The memory this engine may use: a cgroup's limit less its use, else MemAvailable.

The cgroup files are real kernel files where the machine lets a test make a
cgroup (root, a writable v1 memory controller or v2 tree): a child process is
moved into a fresh cgroup with a limit and reads it. Elsewhere that test is
skipped with the reason. The parsing of both versions' files is also checked on
folders laid out as the kernel lays them out.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vllm_moe_offload.cli.cgroup import MemoryCgroup
from tests.conftest import REPO
from vllm_moe_offload.runtime.memory_limit import cgroup_memory, engine_memory, mem_available_bytes

MIB = 2**20


def test_without_a_limit_mem_available_answers():
    view = engine_memory()
    assert 0 < view.available_bytes <= mem_available_bytes() * 1.05
    assert view.source


def test_v1_limit_and_working_set(tmp_path):
    folder = tmp_path / "memory" / "box"
    folder.mkdir(parents=True)
    (folder / "memory.limit_in_bytes").write_text(f"{600 * MIB}\n")
    (folder / "memory.usage_in_bytes").write_text(f"{250 * MIB}\n")
    (folder / "memory.stat").write_text(f"cache 1\nhierarchical_memory_limit {500 * MIB}\ntotal_inactive_file {50 * MIB}\n")
    proc = tmp_path / "cgroup"
    proc.write_text("4:memory:/box\n0::/\n")
    got = cgroup_memory(tmp_path, proc)
    # the tighter of its own and its ancestors' limits; inactive page cache is reclaimable, so not used
    assert (got.version, got.limit_bytes, got.used_bytes) == (1, 500 * MIB, 200 * MIB)
    (folder / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    (folder / "memory.stat").write_text("total_inactive_file 0\n")
    assert cgroup_memory(tmp_path, proc) is None  # v1's "no limit"


def test_unmapped_page_cache_is_reclaimable_active_or_not(tmp_path):
    folder = tmp_path / "memory" / "box"
    folder.mkdir(parents=True)
    (folder / "memory.limit_in_bytes").write_text(f"{600 * MIB}\n")
    (folder / "memory.usage_in_bytes").write_text(f"{400 * MIB}\n")
    # 250 MiB of page cache: 60 mapped by a process, 20 shared memory, 30 inactive
    (folder / "memory.stat").write_text(f"total_cache {250 * MIB}\ntotal_mapped_file {60 * MIB}\n"
                                        f"total_shmem {20 * MIB}\ntotal_inactive_file {30 * MIB}\n")
    proc = tmp_path / "cgroup"
    proc.write_text("4:memory:/box\n")
    assert cgroup_memory(tmp_path, proc).used_bytes == 400 * MIB - (250 - 60 - 20) * MIB
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.max").write_text(f"{600 * MIB}\n")
    (v2 / "memory.current").write_text(f"{400 * MIB}\n")
    (v2 / "memory.stat").write_text(f"anon 1\nfile {250 * MIB}\nfile_mapped {60 * MIB}\nshmem {20 * MIB}\n"
                                    f"inactive_file {30 * MIB}\n")
    proc.write_text("0::/v2\n")
    assert cgroup_memory(tmp_path, proc).used_bytes == 230 * MIB


def test_v2_smallest_limit_on_the_path(tmp_path):
    inner = tmp_path / "outer" / "inner"
    inner.mkdir(parents=True)
    (tmp_path / "outer" / "memory.max").write_text(f"{300 * MIB}\n")
    (inner / "memory.max").write_text("max\n")
    (inner / "memory.current").write_text(f"{100 * MIB}\n")
    (inner / "memory.stat").write_text(f"anon 1\ninactive_file {10 * MIB}\n")
    proc = tmp_path / "cgroup"
    proc.write_text("0::/outer/inner\n")
    got = cgroup_memory(tmp_path, proc)
    assert (got.version, got.limit_bytes, got.used_bytes) == (2, 300 * MIB, 90 * MIB)


def test_a_process_in_a_limited_cgroup_sees_the_limit():
    box = MemoryCgroup.make(512 * MIB)
    if box is None:
        pytest.skip(MemoryCgroup.CANNOT)
    code = ("import json; from vllm_moe_offload.runtime.memory_limit import engine_memory, cgroup_memory; "
            "v = engine_memory(); c = cgroup_memory(); print(json.dumps([v.available_bytes, v.source, c.limit_bytes]))")
    try:
        out = subprocess.run(
            [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=True,
            preexec_fn=box.enter,
        )
        available, source, limit = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        box.remove()
    assert limit == 512 * MIB
    assert 0 < available < 512 * MIB and source.startswith("cgroup v")
