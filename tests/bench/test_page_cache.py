"""The bench's proof that direct I/O bypasses the page cache: ``mincore`` residency before and after reads."""

from __future__ import annotations

import os

import pytest

from vllm_moe_offload.cli.bench_run import page_cache_report, resident_pages
from vllm_moe_offload.cli.tiny_models import make_tiny_model
from vllm_moe_offload.runtime.safetensors_io import CheckpointIndex, TensorReader


def _evict(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_resident_pages_follow_reads(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(os.urandom(64 * 4096))
    _evict(path)
    assert not resident_pages(str(path)).any()
    with open(path, "rb") as f:
        f.read(8 * 4096)
    pages = resident_pages(str(path))
    assert len(pages) == 64 and pages[:8].all()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_model("mixtral", tmp_path_factory.mktemp("pc") / "m")


@pytest.mark.parametrize("direct_io", [True, False])
def test_direct_reads_leave_experts_out_of_the_page_cache(checkpoint, direct_io):
    path = checkpoint / "model.safetensors"
    index = CheckpointIndex(checkpoint)
    experts = [index[n] for n in index.names() if ".experts." in n]
    _evict(path)
    assert page_cache_report(str(checkpoint))["expert_resident_bytes"] == 0
    reader = TensorReader(direct_io=direct_io)
    for loc in experts:
        reader.read([loc])
    if direct_io and reader._warned:
        pytest.skip("this filesystem refuses O_DIRECT")
    reader.close()
    report = page_cache_report(str(checkpoint))
    assert report["expert_bytes"] == sum(loc.num_bytes for loc in experts)
    if direct_io:
        assert report["expert_resident_bytes"] == 0
    else:  # the control: buffered reads fill the page cache
        assert report["expert_resident_bytes"] >= 0.9 * report["expert_bytes"]
