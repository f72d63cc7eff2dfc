"""A lossless coding of bfloat16 expert weights: 0.75 of the bytes to read, decoded as the pieces land.

Where loads are bound by the link (a prefill or a small cache reading expert after expert from the disk),
fewer bytes per expert is the one gain left once the reads are the optimal cache's. A trained model's
bfloat16 weights carry little information in their high byte (the sign and 7 of the 8 exponent bits): in
``../shared/models/tiny-mixtral``'s experts 15 values cover 99.96% of the high bytes (2.7 bits of entropy),
while the low byte (the last exponent bit and the mantissa) is close to random. So each value is stored as a
4-bit code of its high byte plus its low byte, 12 bits instead of 16; the few high bytes outside the table are
escapes, listed with their positions. Decoding is one pass, a table lookup per 16 values where the CPU has
AVX2 (``packed_codec.c``: 0.27-0.35 ms per 3 MiB expert on a 2-core AMD EPYC, about 10 GB/s of output; an
expert of 8 MiB or more with streaming stores, :data:`STREAMING_STORE_BYTES`), and it releases the GIL.

An expert's block is cut into pages of :data:`PAGE` bytes, each holding whole chunks, so a load can read
the block in pieces of whole pages and decode each before the next one reads (``runtime/expert_store.py``):
a large expert's read buffer is then a piece (:data:`MAX_PIECE_BYTES`), not the whole block, which took a
slot's memory on a model of 96 MiB experts. (Version 1 coded a tensor as one segment, decoded once the whole
block was read.)

A block (integers little-endian): pages of :data:`PAGE` bytes (the last one shorter); in each page chunks
back to back, then zeros to the page's end. A chunk codes ``n`` consecutive values of one tensor::

    0    b"MOEC", u32 tensor, u64 offset (its first value's index in the tensor), u64 n, u64 m (escapes),
         u32 coded (1) or raw (0), u32 version, u8 table[16], 8 bytes 0
    64   coded: codes [ceil(n / 2)] (value i in nibble i % 2 of byte i // 2, the low nibble first), then at the
         next multiple of 64 lows [n], then at the next multiple of 64 escape positions u32 [m] (within the
         chunk) and right after them their high bytes u8 [m]; raw: the values [2 n]
    the chunk ends at a multiple of 64

Chunks come in tensor order, each tensor's values in order, every value in exactly one chunk; a tensor's
chunks share its table (its 15 most frequent high bytes). A tensor whose coding would not be smaller (more
escapes than :data:`MAX_ESCAPE_SHARE` of its values) or of fewer than 128 values is stored raw. The C source is compiled with the
system's C compiler at first use into ``$VLLM_CACHE_ROOT/moe_offload/codec`` (``~/.cache/vllm`` by default);
where none works, a NumPy decoder gives the same values more slowly (logged once). No vLLM.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import math
import os
import platform
import struct
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger("vllm.moe_offload.packed_codec")

MAGIC = b"MOEC"
VERSION = 2
#: a chunk's header: magic, tensor, offset, n, m, coded, version, table (then 8 bytes 0)
_HEADER = struct.Struct("<4sIQQQII16s")
HEADER_BYTES = 64
#: every part of a chunk starts at a multiple of this (the decoder's loads are then aligned to cache lines)
ALIGN = 64
#: a block's pages: no chunk crosses a multiple of this from the block's start, so a read of whole pages
#: decodes alone. Small enough that a 3 MiB expert reads in several pieces, large enough that a chunk's header
#: and padding cost nothing (64-250 bytes a page)
PAGE = 256 * 1024
#: a chunk starts in a page only with this much room left in it (else the page ends in zeros)
MIN_CHUNK_ROOM = 4096
#: a load reads a block in pieces of at most this many bytes (whole pages), each decoded before the next one
#: reads, through a read buffer of one piece: a model's experts of a few MiB in one read, a 96 MiB expert in
#: 12 (8 MiB pieces read as fast as one read of it, ``runtime/checked_read.py``)
MAX_PIECE_BYTES = 8 * 2**20
#: a block decodes with streaming stores (past the caches) when its tensors take at least this many bytes: its
#: output could not stay in the caches anyway, and is then not read before it is written. A 96 MiB expert decoded
#: in 10.4-10.8 ms against 15.2-15.7 on the AMD EPYC; a 3 MiB one in 0.34 ms either way
STREAMING_STORE_BYTES = 8 * 2**20
#: the code of a high byte outside the table
ESCAPE = 15
#: a tensor with more escapes than this share of its values is stored raw: its coding would be larger than
#: 15/16 of the raw bytes (12 + 40 x share bits per value against 16)
MAX_ESCAPE_SHARE = 1 / 16

#: 2-byte dtypes the coding applies to (bfloat16's high byte is nearly all exponent; float16's too, less so)
DTYPES = (torch.bfloat16, torch.float16)

#: packed_decode_pages's error codes
_ERRORS = {
    -1: "a chunk header is not one of coding version 2",
    -2: "a chunk is out of order or runs past its tensor",
    -3: "a chunk runs past its page",
    -4: "an escape lies outside its chunk or where no escape is coded",
}


class PackedCodingError(ValueError):
    """A block that does not decode: a header of another version, lengths past its page, an escape out of
    place, values missing."""


def _round(n: int, to: int = ALIGN) -> int:
    return -(-n // to) * to


def chunk_bytes(n: int, m: int, coded: bool) -> int:
    """Bytes of a chunk of ``n`` values with ``m`` escapes, coded or raw."""
    if not coded:
        return _round(HEADER_BYTES + 2 * n)
    return _round(_round(_round(HEADER_BYTES + (n + 1) // 2) + n) + 5 * m)


def max_block_bytes(numels: Sequence[int]) -> int:
    """The most a block of tensors of ``numels`` values can take (every tensor raw, every page's room for
    chunk headers and padding lost): what the store's stale check allows."""
    usable = PAGE - MIN_CHUNK_ROOM - 2 * ALIGN * (len(numels) + 1)
    return (math.ceil(2 * sum(numels) / usable) + 1) * PAGE


def read_piece_bytes(block_bytes: int) -> int:
    """The pieces a load reads a block of up to ``block_bytes`` in (its read buffer): the whole block in whole
    pages, at most :data:`MAX_PIECE_BYTES`."""
    return min(MAX_PIECE_BYTES, _round(block_bytes, PAGE))


def _flat(values: torch.Tensor) -> np.ndarray:
    return values.contiguous().view(-1).view(torch.int16).numpy().view(np.uint16)  # [n]


def encode_block(tensors: Sequence[torch.Tensor]) -> bytearray:
    """One expert's block coding ``tensors`` (each any shape, a 2-byte dtype, in its memory order).

    Holds about 3.5 bytes per value of the largest tensor besides the tensors while it runs (the block, its
    codes and lows before they are copied into it, the high bytes): a store's build codes one expert at a
    time."""
    out = bytearray()
    for index, values in enumerate(tensors):
        if values.dtype not in DTYPES:
            raise ValueError(f"the packed coding takes {[str(d) for d in DTYPES]} values, got {values.dtype}")
        _TensorCoder(index, _flat(values)).write(out)
    return out


class _TensorCoder:
    """One tensor's chunks, appended to a block page by page."""

    def __init__(self, index: int, flat: np.ndarray) -> None:
        self.index, self.flat = index, flat
        n = flat.size
        high = (flat >> 8).astype(np.uint8)
        counts = np.bincount(high, minlength=256)
        top = np.argsort(-counts, kind="stable")[:ESCAPE]  # the 15 most frequent high bytes
        table = np.zeros(16, dtype=np.uint8)
        table[:ESCAPE] = top
        self.table = table.tobytes()
        code_of = np.full(256, ESCAPE, dtype=np.uint8)
        code_of[top] = np.arange(ESCAPE, dtype=np.uint8)
        max_escapes = int(n * MAX_ESCAPE_SHARE)
        self.coded = int(counts[code_of == ESCAPE].sum()) <= max_escapes and n >= 2 * ALIGN
        if not self.coded:
            return
        self.codes = np.empty((n + 1) // 2, dtype=np.uint8)
        self.lows = np.empty(n, dtype=np.uint8)
        escape_pos = np.empty(max(1, max_escapes), dtype=np.uint32)
        escape_high = np.empty(max(1, max_escapes), dtype=np.uint8)
        m = _codec().encode(flat, code_of, self.codes, self.lows, escape_pos, escape_high, max_escapes)
        self.escape_pos, self.escape_high = escape_pos[:m], escape_high[:m]

    def write(self, out: bytearray) -> None:
        n, at = self.flat.size, 0
        while at < n:
            room = PAGE - len(out) % PAGE
            if room < MIN_CHUNK_ROOM:
                out += bytes(room)  # the page ends in zeros
                room = PAGE
            at += self._chunk(out, at, room)

    def _escapes(self, at: int, count: int) -> tuple[int, int]:
        return (int(np.searchsorted(self.escape_pos, at)), int(np.searchsorted(self.escape_pos, at + count)))

    def _fit(self, at: int, room: int) -> int:
        """The most values from ``at`` on whose chunk fits ``room`` bytes: all that are left, or a multiple of
        ``ALIGN`` (a later chunk's codes then start at a whole byte, its values on the SIMD stride)."""
        left = self.flat.size - at
        per_value = 1.5 if self.coded else 2
        count = min(left, int((room - HEADER_BYTES - 3 * ALIGN) / per_value))
        while True:
            if count < left:
                count -= count % ALIGN
            lo, hi = self._escapes(at, count) if self.coded else (0, 0)
            size = chunk_bytes(count, hi - lo, self.coded)
            if size <= room:
                return count
            count -= max(ALIGN, int((size - room) / per_value))

    def _chunk(self, out: bytearray, at: int, room: int) -> int:
        n = self._fit(at, room)
        lo, hi = self._escapes(at, n) if self.coded else (0, 0)
        m = hi - lo
        start = len(out)
        out += bytes(chunk_bytes(n, m, self.coded))
        out[start : start + _HEADER.size] = _HEADER.pack(MAGIC, self.index, at, n, m, int(self.coded), VERSION,
                                                         self.table if self.coded else bytes(16))
        body = start + HEADER_BYTES
        if not self.coded:
            out[body : body + 2 * n] = memoryview(self.flat[at : at + n]).cast("B")
            return n
        codes = self.codes[at // 2 : (at + n + 1) // 2]
        out[body : body + codes.size] = memoryview(codes)
        lows_at = start + _round(HEADER_BYTES + (n + 1) // 2)
        out[lows_at : lows_at + n] = memoryview(self.lows[at : at + n])
        esc_at = start + _round(_round(HEADER_BYTES + (n + 1) // 2) + n)
        out[esc_at : esc_at + 4 * m] = memoryview(self.escape_pos[lo:hi] - np.uint32(at)).cast("B")
        out[esc_at + 4 * m : esc_at + 5 * m] = memoryview(self.escape_high[lo:hi])
        return n


class BlockDecoder:
    """Decodes one block into ``out`` (contiguous tensors of a 2-byte dtype, the block's tensors in order) as
    its pages arrive: :meth:`feed` them in order, whole pages (the last one may be short), then :meth:`finish`.

    Raises :class:`PackedCodingError` for a torn block; ``out`` may then hold part of the values. ``simd``
    False: the plain loop (tests compare the two)."""

    def __init__(self, out: Sequence[torch.Tensor], simd: bool = True) -> None:
        for tensor in out:
            if tensor.dtype not in DTYPES or not tensor.is_contiguous():
                raise ValueError(f"decode into contiguous tensors of {[str(d) for d in DTYPES]}, got "
                                 f"{tensor.dtype}")
        self.out = [tensor.view(-1).view(torch.int16) for tensor in out]
        self.simd = simd
        self.stream = sum(tensor.nbytes for tensor in out) >= STREAMING_STORE_BYTES
        self.cursor = np.zeros(2, dtype=np.int64)  # (tensor, values done)
        self._codec = _codec()

    def feed(self, pages: memoryview | torch.Tensor) -> None:
        """Decode the chunks of ``pages`` (the block's next bytes, a whole number of pages but at its end)."""
        if isinstance(pages, torch.Tensor):
            pages = memoryview(pages.numpy())
        status = self._codec.decode_pages(pages, PAGE, self.out, self.cursor, self.simd, self.stream)
        if status != 0:
            raise PackedCodingError(f"{_ERRORS.get(status, f'error {status}')}: the block is torn")

    def finish(self) -> None:
        """Every value of every tensor was decoded; raises :class:`PackedCodingError` where some were not."""
        tensor, done = (int(v) for v in self.cursor)
        complete = (tensor == len(self.out) - 1 and done == self.out[-1].numel()) or not self.out
        if not complete:
            raise PackedCodingError(f"the block ends after {done} values of tensor {tensor} of {len(self.out)}: "
                                    "values are missing")


def decode_block(block: memoryview | torch.Tensor, out: Sequence[torch.Tensor], simd: bool = True) -> None:
    """Decode a whole block into ``out`` (see :class:`BlockDecoder`)."""
    decoder = BlockDecoder(out, simd=simd)
    decoder.feed(block)
    decoder.finish()


class _Native:
    """The compiled coder (``packed_codec.c``), called through ctypes (which releases the GIL)."""

    name = "C"

    def __init__(self, lib: ctypes.CDLL) -> None:
        ptr, i64 = ctypes.c_void_p, ctypes.c_int64
        lib.packed_decode_pages.argtypes = [ptr, i64, i64, ptr, ptr, i64, ptr, ctypes.c_int, ctypes.c_int]
        lib.packed_decode_pages.restype = ctypes.c_int
        lib.packed_encode.argtypes = [ptr, i64, ptr, ptr, ptr, ptr, ptr, i64]
        lib.packed_encode.restype = i64
        lib.packed_simd.restype = ctypes.c_int
        self._lib = lib
        self.simd = bool(lib.packed_simd())
        if self.simd:
            self.name = "C, AVX2"

    def decode_pages(self, pages: memoryview, page: int, out: list[torch.Tensor], cursor: np.ndarray,
                     simd: bool, stream: bool) -> int:
        outs = (ctypes.c_void_p * len(out))(*(t.data_ptr() for t in out))
        numels = np.array([t.numel() for t in out], dtype=np.int64)
        buf = np.frombuffer(pages, dtype=np.uint8)
        return self._lib.packed_decode_pages(buf.ctypes.data, buf.size, page, outs, numels.ctypes.data, len(out),
                                             cursor.ctypes.data, int(simd), int(stream))

    def encode(self, flat: np.ndarray, code_of: np.ndarray, codes: np.ndarray, lows: np.ndarray,
               escape_pos: np.ndarray, escape_high: np.ndarray, max_escapes: int) -> int:
        m = self._lib.packed_encode(flat.ctypes.data, flat.size, code_of.ctypes.data, codes.ctypes.data,
                                    lows.ctypes.data, escape_pos.ctypes.data, escape_high.ctypes.data, max_escapes)
        if m < 0:
            raise AssertionError("more escapes than counted")  # the coder counted them first
        return m


class _NumPy:
    """The same coding in NumPy, where no C compiler works: the same values, several times slower."""

    name = "NumPy"
    simd = False

    def decode_pages(self, pages: memoryview, page: int, out: list[torch.Tensor], cursor: np.ndarray,
                     simd: bool, stream: bool) -> int:
        raw = np.frombuffer(pages, dtype=np.uint8)
        for page_at in range(0, raw.size, page):
            end, at = min(page_at + page, raw.size), page_at
            while at + HEADER_BYTES <= end:
                magic, index, offset, n, m, coded, version, table = _HEADER.unpack(raw[at : at + _HEADER.size])
                if magic == bytes(4):
                    break  # padding
                if magic != MAGIC or version != VERSION:
                    return -1
                tensor, done = int(cursor[0]), int(cursor[1])
                if tensor < len(out) and done == out[tensor].numel():
                    tensor, done = tensor + 1, 0
                if (tensor >= len(out) or index != tensor or offset != done or n == 0
                        or n > out[tensor].numel() - done or m > n or coded > 1):
                    return -2
                size = chunk_bytes(n, m, bool(coded))
                if size > end - at:
                    return -3
                dest = out[tensor].numpy().view(np.uint16)[done : done + n]
                body = at + HEADER_BYTES
                if not coded:
                    dest[:] = raw[body : body + 2 * n].view(np.uint16)
                else:
                    packed = raw[body : body + (n + 1) // 2]
                    code = np.empty(2 * packed.size, dtype=np.uint8)
                    code[0::2], code[1::2] = packed & 15, packed >> 4
                    code = code[:n]
                    lows_at = at + _round(HEADER_BYTES + (n + 1) // 2)
                    low = raw[lows_at : lows_at + n].astype(np.uint16)
                    values = (np.frombuffer(table, dtype=np.uint8)[code].astype(np.uint16) << 8) | low
                    esc_at = at + _round(_round(HEADER_BYTES + (n + 1) // 2) + n)
                    pos = raw[esc_at : esc_at + 4 * m].view(np.uint32).astype(np.int64)
                    if m and (pos.max() >= n or (code[pos] != ESCAPE).any()):
                        return -4
                    values[pos] = (raw[esc_at + 4 * m : esc_at + 5 * m].astype(np.uint16) << 8) | low[pos]
                    dest[:] = values
                cursor[:] = (tensor, done + n)
                at += size
        return 0

    def encode(self, flat: np.ndarray, code_of: np.ndarray, codes: np.ndarray, lows: np.ndarray,
               escape_pos: np.ndarray, escape_high: np.ndarray, max_escapes: int) -> int:
        high = (flat >> 8).astype(np.uint8)
        code = code_of[high]
        padded = np.zeros(2 * codes.size, dtype=np.uint8)
        padded[: flat.size] = code
        codes[:] = padded[0::2] | (padded[1::2] << 4)
        lows[:] = flat.astype(np.uint8)
        pos = np.flatnonzero(code == ESCAPE)
        escape_pos[: pos.size] = pos
        escape_high[: pos.size] = high[pos]
        return int(pos.size)


_lock = threading.Lock()
_loaded: _Native | _NumPy | None = None


def _codec() -> _Native | _NumPy:
    global _loaded
    if _loaded is None:
        with _lock:
            if _loaded is None:
                _loaded = _load()
    return _loaded


def implementation() -> str:
    """Which coder runs: "C, AVX2", "C" or "NumPy" (compiles the C one at the first call)."""
    return _codec().name


def _load() -> _Native | _NumPy:
    try:
        return _Native(ctypes.CDLL(str(_compiled())))
    except (OSError, subprocess.SubprocessError) as exc:
        logger.warning("the packed store's C decoder could not be built (%s); decoding with NumPy, several times "
                       "slower (install a C compiler, or set CC, to get it)", exc)
        return _NumPy()


def _compiled() -> Path:
    """The shared library of ``packed_codec.c``, compiled once per source, compiler and machine."""
    source = Path(__file__).with_name("packed_codec.c")
    compiler = os.environ.get("CC", "cc")
    flags = ["-O3", "-shared", "-fPIC", "-std=c11"]
    key = hashlib.sha256(source.read_bytes() + " ".join([compiler, *flags, platform.machine()]).encode())
    root = Path(os.environ.get("VLLM_CACHE_ROOT") or Path.home() / ".cache" / "vllm") / "moe_offload" / "codec"
    target = root / f"packed_codec-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".packed_codec-", suffix=".so", dir=root)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *flags, "-o", tmp, str(source)], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise OSError(f"{compiler} exited with {done.returncode}: {done.stderr.strip()[-500:]}")
        os.replace(tmp, target)  # atomic: processes compiling at once each install a whole library
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    logger.info("compiled the packed store's decoder into %s", target)
    return target
