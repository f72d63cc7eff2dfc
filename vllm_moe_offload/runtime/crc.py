"""The CRC-32 that expert stores keep per expert block: zlib's polynomial, computed by ISA-L where installed.

Every expert block's crc32 is computed when a store is written and checked at
the block's first read in a process (``runtime/expert_store.py``,
``runtime/checked_read.py``). zlib's ``crc32`` (1.2.13, as CPython links it
here) runs at about 2.3 GB/s on this project's Xeon: a 96 MiB expert took
44-46 ms of CPU, as long as its direct read from the disk, on a 2-core box whose
cores the MoE kernel keeps busy. ISA-L's (``isal``, a pinned dependency) gives
the same value at about 12 GB/s there (8.4-8.7 ms), and releases the GIL as
zlib's does. Stores written with either read back under the other. No torch,
no vLLM.
"""

from __future__ import annotations

import zlib

try:
    from isal.isal_zlib import crc32 as _fast_crc32
except ImportError:  # a platform without isal's wheels: zlib's, the same value, slower
    _fast_crc32 = None

#: which implementation :func:`crc32` uses ("isal" or "zlib"), for logs and benchmarks
IMPLEMENTATION = "zlib" if _fast_crc32 is None else "isal"


def crc32(data, value: int = 0) -> int:
    """``zlib.crc32(data, value)``: the CRC-32 of ``data`` (bytes-like) continued from ``value``."""
    if _fast_crc32 is None:
        return zlib.crc32(data, value)
    return _fast_crc32(data, value)
