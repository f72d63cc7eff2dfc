"""Host memory for experts: aligned for direct I/O, and freed temporaries returned to the OS.

:func:`aligned_empty` gives tensors whose memory starts on a page, so that a
direct read (``O_DIRECT``) can land in them with no staging buffer and no copy
(the kernel-layout store reads experts straight into their slots).

Every expert load makes a few megabyte-sized temporaries (the read span, the
concatenated and converted weights). glibc serves large allocations with mmap,
but raises that threshold each time such a chunk is freed ("dynamic mmap
threshold"), after which same-sized temporaries come from the heap of the I/O
thread's arena and stay resident after free. Measured here on a model with
192 MiB of experts at a 25% budget: RssAnon 650 MiB with the dynamic threshold,
561 MiB with a fixed one, against 707 MiB for stock vLLM. Fixing the threshold
makes the memory saved by offload show up as saved.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import math
import mmap
import threading
import time
from collections.abc import Sequence

import torch

from vllm_moe_offload.core.plan import HUGE_PAGE_BYTES, READ_ALIGN_BYTES

logger = logging.getLogger("vllm.moe_offload.memory")

#: glibc's mallopt parameter number for the mmap threshold (malloc.h)
_M_MMAP_THRESHOLD = -3
#: glibc's default starting threshold; setting it explicitly turns off the dynamic raise
MMAP_THRESHOLD_BYTES = 128 * 1024

_done = False

#: what :func:`aligned_empty` aligns to: O_DIRECT's block alignment (core/plan.py); pages are multiples of it
ALIGN_BYTES = READ_ALIGN_BYTES


def huge_page_map(num_bytes: int) -> mmap.mmap:
    """A private anonymous mapping of ``num_bytes``, advised for transparent huge pages (``MADV_HUGEPAGE``).

    Linux starts an anonymous mapping whose length is a whole number of huge pages
    (``HUGE_PAGE_BYTES``) on one, so that every page of it can be huge.

    Direct reads land 2-3x faster in huge pages on this project's VM: 3 MiB read with ``O_DIRECT`` in
    0.8-1.0 ms into them against 2.1-2.4 ms into 4 KiB pages (the host pins the destination page by
    page). Where the kernel refuses the advice (THP ``never`` or not Linux), small pages as before.
    """
    buf = mmap.mmap(-1, num_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        buf.madvise(mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError):
        logger.debug("MADV_HUGEPAGE refused; a mapping of %d bytes uses small pages", num_bytes)
    return buf


def aligned_empty(shape: tuple[int, ...], dtype: torch.dtype, huge_pages: bool = False) -> torch.Tensor:
    """An uninitialized CPU tensor of ``shape`` whose memory starts ``ALIGN_BYTES``-aligned.

    Backed by an anonymous mapping of exactly its bytes rounded up to a page (an
    over-allocated ``torch.empty`` would hold up to one page more than the
    ledger counts). The tensor keeps the mapping alive; pages are touched only
    when written, as for a large ``torch.empty``.

    ``huge_pages`` (the slot pools): a private mapping advised for transparent
    huge pages (``MADV_HUGEPAGE``; used where the kernel's setting is
    ``always`` or ``madvise``, ignored where it is ``never``). Slots are
    written by direct reads and read whole by the MoE kernel; with 2 MiB pages
    both walk 512x fewer pages. In-process on the padded tiny-mixtral (lru,
    three runs each): the stall per decode token 2.2-2.5 ms against 2.8-3.3 at
    25% and the time per token 8-10% less; at 50% -12%, -19% and +3%. Left out
    for per-load temporaries, which would pay for a huge page's zeroing on
    every load.
    """
    num_bytes = math.prod(shape) * dtype.itemsize
    if num_bytes == 0:
        return torch.empty(shape, dtype=dtype)
    if huge_pages:
        buf = huge_page_map(num_bytes)
    else:
        buf = mmap.mmap(-1, num_bytes)
    # [bytes] uint8 over the mapping, then reinterpreted; anonymous maps start on a page
    raw = torch.frombuffer(buf, dtype=torch.uint8)
    assert raw.data_ptr() % ALIGN_BYTES == 0, "anonymous mappings start on a page"
    return raw.view(dtype).view(shape)


@functools.cache
def _libc_function(name: str):
    """The C library's function ``name`` (errno kept for ``ctypes.get_errno``); None where there is none.
    Looked up once per name."""
    path = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(path, use_errno=True), name) if path else None
    except (OSError, AttributeError):
        return None


def is_aligned(tensor: torch.Tensor, align: int = ALIGN_BYTES) -> bool:
    """``tensor`` is contiguous CPU memory starting and ending on ``align`` boundaries: a direct read can
    write it whole."""
    return (
        tensor.device.type == "cpu" and tensor.is_contiguous()
        and tensor.data_ptr() % align == 0 and tensor.nbytes % align == 0
    )


def return_large_frees_to_the_os() -> bool:
    """Fix glibc's mmap threshold (process-wide, once). False where not glibc."""
    global _done
    if _done:
        return True
    mallopt = _libc_function("mallopt")
    if mallopt is None or not mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES):
        logger.debug("mallopt unavailable; freed expert temporaries may stay resident")
        return False
    _done = True
    return True


#: madvise advice (Linux 5.14+): fault a range's pages in as a write would, leaving what they hold unchanged
_MADV_POPULATE_WRITE = 23
#: bytes one madvise call pages in: between calls the background thread looks whether it should stop
POPULATE_CHUNK_BYTES = 64 * 2**20


def populate(tensor: torch.Tensor, stop: threading.Event | None = None) -> bool:
    """Page in every page of the CPU ``tensor`` now, without changing what it holds.

    An empty tensor's pages are only mapped when first written, so the first load
    into each slot pays for its pages: on this project's development VM about
    0.3 s per 96 MiB where the host backs guest memory lazily (0.05 s where it
    already does), which made the first request after start-up read experts at
    a seventh of the disk's rate. ``MADV_POPULATE_WRITE`` faults the pages in
    inside the kernel and leaves their contents alone, so it is safe while
    loads write into the same memory. False where the kernel or libc cannot
    (the pages are then mapped by the loads, as before) or when ``stop`` is set.
    """
    if tensor.device.type != "cpu" or tensor.nbytes == 0:
        return False
    madvise = _libc_function("madvise")
    if madvise is None:
        return False
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    start = tensor.data_ptr() // mmap.PAGESIZE * mmap.PAGESIZE  # madvise takes a page-aligned start
    end = tensor.data_ptr() + tensor.nbytes
    for at in range(start, end, POPULATE_CHUNK_BYTES):
        if stop is not None and stop.is_set():
            return False
        if madvise(at, min(POPULATE_CHUNK_BYTES, end - at), _MADV_POPULATE_WRITE) != 0:
            logger.debug("MADV_POPULATE_WRITE refused (errno %d); slot pages map on first load", ctypes.get_errno())
            return False
    return True


class Populator:
    """Pages in the slot pools on a background thread (:func:`populate`), once each, after start-up's loads.

    Runs while the engine finishes starting and serves its first steps; the
    loads that reach a page first map it themselves, as they would without it.
    """

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        seen: dict[int, torch.Tensor] = {}
        for tensor in tensors:  # a shared pool's tensors are every layer's: page each in once
            if tensor.device.type == "cpu" and tensor.nbytes:
                seen.setdefault(tensor.data_ptr(), tensor)
        self.tensors = list(seen.values())
        self.num_bytes = sum(t.nbytes for t in self.tensors)
        self.took_s: float | None = None  # set when every tensor was paged in
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="moe-offload-populate", daemon=True)

    def start(self) -> Populator:
        if self.tensors:
            self._thread.start()
        return self

    def _run(self) -> None:
        started = time.perf_counter()
        for tensor in self.tensors:
            if not populate(tensor, self._stop):
                return
        self.took_s = time.perf_counter() - started
        logger.info("MoE offload: slot memory paged in (%.2f GiB in %.1f s)", self.num_bytes / 2**30, self.took_s)

    def join(self, timeout: float | None = None) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    def stop(self) -> None:
        self._stop.set()
        self.join()
