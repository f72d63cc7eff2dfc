"""Slot memory (``runtime/memory.py``): paged in ahead of the loads without changing what it holds; huge pages for the pools."""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import threading

import pytest
import torch

from vllm_moe_offload.runtime.memory import ALIGN_BYTES, Populator, aligned_empty, populate
from vllm_moe_offload.runtime.slots import slot_pool
from tests.runtime.conftest import huge_bytes_of, thp_setting

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]


def resident_pages(tensor: torch.Tensor) -> int:
    """How many of ``tensor``'s pages are mapped in memory now (``mincore``)."""
    pages = (tensor.nbytes + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    vec = ctypes.create_string_buffer(pages)
    assert _libc.mincore(tensor.data_ptr(), tensor.nbytes, vec) == 0, ctypes.get_errno()
    return sum(b & 1 for b in vec.raw)


def _pool(mib: int = 16) -> torch.Tensor:
    return aligned_empty((mib, 2**20), torch.uint8)


def test_every_page_is_mapped_and_what_was_written_stays():
    pool = _pool()
    pages = pool.nbytes // mmap.PAGESIZE
    pool[3, :100] = 7  # one page written before
    assert resident_pages(pool) < pages // 2
    if not populate(pool):
        pytest.skip("this kernel has no MADV_POPULATE_WRITE (Linux 5.14)")
    assert resident_pages(pool) == pages
    assert bool((pool[3, :100] == 7).all())


def test_loads_writing_meanwhile_keep_their_bytes():
    # a load may write a slot while its pages are paged in: populating never writes
    pool = _pool(64)
    pattern = torch.arange(2**20, dtype=torch.int64).remainder(251).to(torch.uint8)  # [1 MiB]
    thread = threading.Thread(target=populate, args=(pool,))
    thread.start()
    for row in range(0, 64, 3):
        pool[row] = pattern
    thread.join()
    assert all(torch.equal(pool[row], pattern) for row in range(0, 64, 3))


def test_the_populator_pages_each_pool_once_and_stops_when_told():
    a, b = _pool(), _pool(8)
    done = Populator([a, b, a, torch.empty(0)]).start()  # a shared pool appears once per layer
    done.join(timeout=60)
    assert done.num_bytes == a.nbytes + b.nbytes and len(done.tensors) == 2
    if done.took_s is None:
        pytest.skip("this kernel has no MADV_POPULATE_WRITE (Linux 5.14)")
    assert resident_pages(a) == a.nbytes // mmap.PAGESIZE and resident_pages(b) == b.nbytes // mmap.PAGESIZE
    stopped = Populator([_pool()])
    stopped._stop.set()
    stopped.start().join(timeout=60)
    assert stopped.took_s is None  # told to stop before it began: nothing paged in, nothing logged
    Populator([]).start().stop()  # nothing to page in: no thread


def test_slot_pools_ask_for_huge_pages_and_keep_their_bytes():
    # the slot pool of 8 slots of 2 MiB: private memory advised for transparent huge pages
    pool = slot_pool(8, (2**20,), torch.bfloat16, torch.device("cpu"))
    assert pool.data_ptr() % ALIGN_BYTES == 0
    pattern = torch.arange(2**20).remainder(97).to(torch.bfloat16)
    for slot in range(8):
        pool[slot] = pattern
    assert all(torch.equal(pool[slot], pattern) for slot in range(8))
    if thp_setting() not in ("always", "madvise"):
        pytest.skip(f"transparent huge pages are {thp_setting()!r} here")
    # the kernel gives huge pages where it has free 2 MiB blocks: most of a 16 MiB pool on a machine with room
    assert huge_bytes_of(pool) >= 4 * 2**20, huge_bytes_of(pool)
    plain = aligned_empty((8, 2**20), torch.bfloat16)  # a per-load temporary: small pages, as before
    plain.fill_(1)
    assert huge_bytes_of(plain) == 0
