"""runtime/crc.py: the experts' CRC-32 is zlib's, whichever implementation computes it."""

from __future__ import annotations

import os
import zlib

import pytest

from vllm_moe_offload.runtime import crc


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 3 * 2**20 + 7])
def test_the_value_is_zlibs_whole_and_chained(size):
    data = os.urandom(size)
    assert crc.crc32(data) == zlib.crc32(data)
    cut = size // 3
    assert crc.crc32(data[cut:], crc.crc32(data[:cut])) == zlib.crc32(data)
    with memoryview(data) as view:  # the loaders hand it views of their read buffers
        assert crc.crc32(view[cut:], zlib.crc32(view[:cut])) == zlib.crc32(data)


def test_isal_is_installed_where_the_project_is():
    """The pinned dependency is what makes first reads cheap (the module's docstring); without it the
    checks fall back to zlib's, right but 5x slower, which no other test would notice."""
    assert crc.IMPLEMENTATION == "isal"
