"""Zero-copy loads: a direct read lands in aligned slot memory (no staging buffer, no copy), bit-exact; what
is not aligned passes through a small buffer; an old, misaligned or truncated kernel store is never misread."""

from __future__ import annotations

import ctypes
import json
import logging
import os
import threading
import zlib

import pytest
import torch

from vllm_moe_offload.runtime.expert_store import (
    FORMAT_VERSION,
    KERNEL,
    MANIFEST,
    ExpertStoreError,
    KernelLayout,
    LayerSpec,
    open_or_build,
    store_directory,
)
from vllm_moe_offload.runtime.kernel_source import KernelSource
from vllm_moe_offload.runtime.ledger import BudgetLedger, MemoryKind
from vllm_moe_offload.runtime.memory import ALIGN_BYTES, aligned_empty, is_aligned
from vllm_moe_offload.runtime import checked_read, safetensors_io
from vllm_moe_offload.runtime.safetensors_io import CheckpointIndex, TensorReader, ThreadLocalReaders
from vllm_moe_offload.runtime.slots import slot_pool
from tests.runtime.conftest import E, H, I, LAYERS
from tests.runtime.conftest import expert_names as _names

#: a quantized layer's extras: one of whole 4 KiB blocks (read in place), two small scales (through the buffer)
_BIG, _SMALL, _ODD = ((1024,), torch.float32), ((3, 5), torch.float32), ((7,), torch.bfloat16)


class WithScales:
    """A converter to [H, 2I] and [I, H] that also gives per-expert "scales" derived from the weights."""

    def __init__(self, layer_idx: int, extras: bool = True) -> None:
        self.scale = float(layer_idx + 1)
        self.extras = extras

    def __call__(self, w1, w3, w2, into=None):
        w13 = (torch.cat([w1, w3]) * self.scale).t().contiguous()
        w2k = (w2 * self.scale).t().contiguous()
        if not self.extras:
            return w13, w2k
        flat = w13.float().flatten()
        return w13, w2k, flat[:1024].clone(), flat[:15].reshape(3, 5) * 2, w2k.flatten()[:7].clone()


def _layout(extras: bool) -> KernelLayout:
    identity = {"vllm": "test", "isa": "vec", "tp_rank": 0, "tp_size": 1}
    return KernelLayout(identity, ((H, 2 * I), torch.bfloat16), ((I, H), torch.bfloat16),
                        [WithScales(i, extras) for i in range(LAYERS)], (_BIG, _SMALL, _ODD) if extras else ())


def _open(folder, root, readers, layout):
    layers = [LayerSpec(_names(i), E) for i in range(LAYERS)]
    return open_or_build(CheckpointIndex(folder), layers, KERNEL, store_directory(root, folder, KERNEL), readers, layout)


def _pools(layout: KernelLayout, num_slots: int = 3) -> list[torch.Tensor]:
    return [slot_pool(num_slots, shape, dtype, torch.device("cpu")) for shape, dtype in layout.parts]


class _Iovecs:
    """Records the memory addresses each ``os.preadv`` reads into."""

    def __init__(self, monkeypatch) -> None:
        self.calls: list[list[tuple[int, int]]] = []
        real = os.preadv

        def preadv(fd, buffers, offset):
            self.calls.append([(ctypes.addressof(ctypes.c_char.from_buffer(b)), len(b)) for b in buffers])
            return real(fd, buffers, offset)

        monkeypatch.setattr(os, "preadv", preadv)


def test_pools_and_fresh_tensors_are_aligned_where_a_slot_is_whole_blocks():
    w13 = slot_pool(3, (H, 2 * I), torch.bfloat16, torch.device("cpu"))
    assert w13.data_ptr() % ALIGN_BYTES == 0 and all(is_aligned(w13[s]) for s in range(3))
    small = slot_pool(3, (3, 5), torch.float32, torch.device("cpu"))  # 60 bytes a slot: no slot could be aligned
    assert small.shape == (3, 3, 5) and not is_aligned(small[1])
    fresh = aligned_empty((5, 1000), torch.float16)
    assert fresh.data_ptr() % ALIGN_BYTES == 0 and fresh.shape == (5, 1000)
    fresh.fill_(1.5)  # the mapping is writable and outlives the name that made it
    assert fresh.sum().item() == 7500


@pytest.mark.parametrize("extras", [False, True], ids=["bf16", "with-scales"])
def test_a_load_lands_in_its_slot_bit_exact_with_no_staging(checkpoint, tmp_path, monkeypatch, extras):
    folder, tensors = checkpoint
    layout = _layout(extras)
    ledger = BudgetLedger(10**8)
    readers = ThreadLocalReaders(direct_io=True, lanes=1, ledger=ledger, convert_bytes=10**6)
    store = _open(folder, tmp_path / "s", readers, layout)
    offsets = layout.offsets
    assert offsets[1] % ALIGN_BYTES == 0 and all(o % ALIGN_BYTES == 0 for o in offsets[:3 if extras else 2])
    pools = _pools(layout)
    iovecs = _Iovecs(monkeypatch)
    for layer_idx in range(LAYERS):
        source = KernelSource(store, _names(layer_idx).prefix, readers)
        for e in range(E):
            slot = e % 3
            into = tuple(pool[slot] for pool in pools)
            got = source.fetch(e, into=into)
            w1, w3, w2 = (tensors[n] for n in _names(layer_idx).tensor_names(e))
            want = WithScales(layer_idx, extras)(w1, w3, w2)
            assert all(a.data_ptr() == b.data_ptr() for a, b in zip(got.tensors, into))
            assert all(torch.equal(a, b) for a, b in zip(into, want))  # bit-exact in the slot
            (call,) = iovecs.calls[-1:]
            # the first iovecs are the slot's own tensors (w13, w2, and the whole-block extra): read in place
            direct = [(t.data_ptr(), t.nbytes) for t in into[: 3 if extras else 2]]
            assert call[: len(direct)] == direct
            # the rest, the small scales and the padding, is one block of the read buffer
            assert sum(n for _, n in call[len(direct):]) == (ALIGN_BYTES if extras else 0)
    assert len(iovecs.calls) == LAYERS * E  # one read per load
    # no staging: without extras no read buffer at all; never a conversion hold
    assert ledger.stats()["peak_by_kind"][MemoryKind.READ_BUFFER.value] == (ALIGN_BYTES if extras else 0)
    assert layout.staged_read_bytes == (ALIGN_BYTES if extras else 0)  # what the plan reserves for these loads
    assert ledger.stats()["peak_by_kind"][MemoryKind.CONVERT.value] == 0
    readers.close()


def test_unaligned_slots_and_buffered_reads_still_give_the_bytes(checkpoint, tmp_path, monkeypatch):
    folder, tensors = checkpoint
    layout = _layout(True)
    readers = ThreadLocalReaders(direct_io=True)
    store = _open(folder, tmp_path / "s", readers, layout)
    prefix = _names(1).prefix
    w1, w3, w2 = (tensors[n] for n in _names(1).tensor_names(2))
    want = WithScales(1)(w1, w3, w2)
    # slots 64 bytes off alignment (as torch.empty may give): everything passes through the read buffer
    raw = torch.empty(sum(t.nbytes for t in want) + 2 * ALIGN_BYTES, dtype=torch.uint8)
    at = -raw.data_ptr() % ALIGN_BYTES + 64
    unaligned = []
    for t in want:
        unaligned.append(raw[at : at + t.nbytes].view(t.dtype).view(t.shape))
        at += t.nbytes + 64
    KernelSource(store, prefix, readers).fetch(2, into=tuple(unaligned))
    assert all(torch.equal(a, b) for a, b in zip(unaligned, want))
    # buffered (no O_DIRECT): no alignment needed, every tensor is read in place through the page cache
    buffered = ThreadLocalReaders(direct_io=False)
    iovecs = _Iovecs(monkeypatch)
    for t in unaligned:
        t.zero_()
    KernelSource(store, prefix, buffered).fetch(2, into=tuple(unaligned))
    assert all(torch.equal(a, b) for a, b in zip(unaligned, want))
    assert {t.data_ptr() for t in unaligned} <= {addr for addr, _ in iovecs.calls[-1]}
    readers.close()
    buffered.close()


def test_read_into_checks_the_range_and_returns_its_crc(tmp_path):
    path = tmp_path / "blob"
    data = os.urandom(5 * ALIGN_BYTES)
    path.write_bytes(data)
    reader = TensorReader(direct_io=True)
    a = aligned_empty((ALIGN_BYTES // 2,), torch.int16)  # one block, in place
    b = torch.empty(100, dtype=torch.uint8)  # copied
    # the range starts inside a block: read from the block's start, the range's bytes placed as asked
    offset = ALIGN_BYTES + 100
    crc = reader.read_into(str(path), offset, 3 * ALIGN_BYTES - 100, [(ALIGN_BYTES - 100, a), (5, b)], checksum=True)
    assert bytes(a.view(torch.uint8).numpy()) == data[2 * ALIGN_BYTES : 3 * ALIGN_BYTES]
    assert bytes(b.numpy()) == data[offset + 5 : offset + 105]
    assert crc == zlib.crc32(data[offset : 4 * ALIGN_BYTES])
    with pytest.raises(ValueError, match="parts overlap"):
        reader.read_into(str(path), 0, ALIGN_BYTES, [(0, b), (50, b)])
    with pytest.raises(ValueError, match="outside the 4096 bytes read"):
        reader.read_into(str(path), 0, ALIGN_BYTES, [(ALIGN_BYTES - 50, b)])
    with pytest.raises(OSError, match="short read"):
        reader.read_into(str(path), 4 * ALIGN_BYTES, 2 * ALIGN_BYTES, [(0, a)])
    reader.close()


@pytest.mark.parametrize("piece_blocks", [1, 2, 3, 64])
def test_a_checked_read_in_pieces_lands_and_checks_as_one_read(tmp_path, monkeypatch, piece_blocks):
    """A checked read larger than a piece reads piece by piece, the crc32 computed on the checker thread while
    the next piece reads: the same bytes in every part and the same crc32 as one read's, whatever the piece
    size against the parts (cut inside a part, at its end, never inside the read buffer's runs)."""
    path = tmp_path / "blob"
    data = os.urandom(12 * ALIGN_BYTES)
    path.write_bytes(data)
    monkeypatch.setattr(checked_read, "PIECE_BYTES", piece_blocks * ALIGN_BYTES)
    reads = []
    preadv = os.preadv
    monkeypatch.setattr(safetensors_io.os, "preadv", lambda fd, bufs, off: reads.append(off) or preadv(fd, bufs, off))
    checker_threads = set()
    crc32 = checked_read.crc32
    monkeypatch.setattr(checked_read, "crc32",
                        lambda data, *crc: checker_threads.add(threading.current_thread().name) or crc32(data, *crc))
    reader = TensorReader(direct_io=True)
    big = aligned_empty((5 * ALIGN_BYTES // 2,), torch.int16)  # five blocks, in place
    small = aligned_empty((ALIGN_BYTES,), torch.uint8)  # one block, in place
    odd = torch.empty(100, dtype=torch.uint8)  # copied out of the read buffer
    offset = ALIGN_BYTES + 100  # starts inside a block
    length = 9 * ALIGN_BYTES - 300
    parts = [(ALIGN_BYTES - 100, big), (6 * ALIGN_BYTES - 100, small), (7 * ALIGN_BYTES, odd)]
    crc = reader.read_into(str(path), offset, length, parts, checksum=True)
    assert bytes(big.view(torch.uint8).numpy()) == data[2 * ALIGN_BYTES : 7 * ALIGN_BYTES]
    assert bytes(small.numpy()) == data[7 * ALIGN_BYTES : 8 * ALIGN_BYTES]
    assert bytes(odd.numpy()) == data[offset + 7 * ALIGN_BYTES : offset + 7 * ALIGN_BYTES + 100]
    assert crc == zlib.crc32(data[offset : offset + length])
    pieced = piece_blocks * ALIGN_BYTES < length
    assert (len(reads) > 1) == pieced
    assert all(off % ALIGN_BYTES == 0 for off in reads)
    assert any(name.startswith("moe-offload-crc") for name in checker_threads) == pieced
    # unchecked: one read, whatever its size
    reads.clear()
    assert reader.read_into(str(path), offset, length, parts) is None
    assert len(reads) == 1
    # the file ends inside the range: a short read, in pieces too
    with pytest.raises(OSError, match="short read"):
        reader.read_into(str(path), 8 * ALIGN_BYTES, 6 * ALIGN_BYTES, [(0, big)], checksum=True)
    reader.close()


def test_an_old_misaligned_or_truncated_store_is_never_misread(checkpoint, tmp_path, readers, caplog):
    folder, tensors = checkpoint
    store = _open(folder, tmp_path / "s", readers, _layout(False))
    manifest_path = store.directory / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    assert manifest["format_version"] == FORMAT_VERSION == 2
    # a store of the previous format: rebuilt, with the reason in the log
    manifest_path.write_text(json.dumps(dict(manifest, format_version=1)))
    with caplog.at_level(logging.WARNING, logger="vllm.moe_offload.expert_store"):
        store = _open(folder, tmp_path / "s", readers, _layout(False))
    assert "is stale (format_version 1, expected 2)" in caplog.text
    # a block that does not start aligned (a hand-edited or foreign manifest): rebuilt, never read
    manifest = json.loads(manifest_path.read_text())
    key = _names(0).prefix
    manifest["layers"][key]["experts"][KERNEL][1][0] += 512
    manifest_path.write_text(json.dumps(manifest))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vllm.moe_offload.expert_store"):
        store = _open(folder, tmp_path / "s", readers, _layout(False))
    assert f"expert 1 in {store.layer_file(key)} is at byte" in caplog.text and "rebuilding" in caplog.text
    # truncated under a running engine: the read is short and refused
    source = KernelSource(store, key, readers)
    block = store.block(key, E - 1, KERNEL)
    os.truncate(store.layer_file(key), block.offset + ALIGN_BYTES)
    pools = _pools(_layout(False))
    with pytest.raises(ExpertStoreError, match=rf"reading expert {E - 1} of {key} \(kernel\) .* short read"):
        source.fetch(E - 1, into=tuple(p[0] for p in pools))
    # and at the next start it is stale (the file's size no longer matches): rebuilt
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vllm.moe_offload.expert_store"):
        store = _open(folder, tmp_path / "s", readers, _layout(False))
    assert "is missing or has the wrong size" in caplog.text
    fresh = ThreadLocalReaders(direct_io=True)  # an engine's readers: their descriptors open the new files
    got = KernelSource(store, key, fresh).fetch(E - 1, into=tuple(p[0] for p in pools))
    w1, w3, w2 = (tensors[n] for n in _names(0).tensor_names(E - 1))
    assert all(torch.equal(a, b) for a, b in zip(got.tensors, WithScales(0, False)(w1, w3, w2)))
    fresh.close()


def test_into_of_the_wrong_shape_is_refused(checkpoint, tmp_path, readers):
    folder, _ = checkpoint
    store = _open(folder, tmp_path / "s", readers, _layout(False))
    wrong = (torch.empty(2 * I, H, dtype=torch.bfloat16), torch.empty(I, H, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"cannot read expert 0 of .* into .*: the store holds"):
        KernelSource(store, _names(0).prefix, readers).fetch(0, into=wrong)
