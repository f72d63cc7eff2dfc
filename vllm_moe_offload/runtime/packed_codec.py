"""A lossless coding of bfloat16 expert weights: 0.75 of the bytes to read, one pass to decode.

Where loads are bound by the link (a prefill or a small cache reading expert after expert from the disk),
fewer bytes per expert is the one gain left once the reads are the optimal cache's. A trained model's
bfloat16 weights carry little information in their high byte (the sign and 7 of the 8 exponent bits): in
``../shared/models/tiny-mixtral``'s experts 15 values cover 99.96% of the high bytes (2.7 bits of entropy),
while the low byte (the last exponent bit and the mantissa) is close to random. So each value is stored as a
4-bit code of its high byte plus its low byte, 12 bits instead of 16; the few high bytes outside the table are
escapes, listed with their positions. Decoding is one pass, a table lookup per 16 values where the CPU has
AVX2 (``packed_codec.c``: 0.27-0.32 ms per 3 MiB expert on a 2-core AMD EPYC, about 10 GB/s of output), and
it releases the GIL. The decode follows the read, so a load gains only where reading a quarter of the
expert takes longer than decoding it: measured, on links under about 2 GB/s, not on that EPYC's 4.5 GB/s
disk (``docs/bench/packed-store/``).

A segment (one tensor's values; integers little-endian)::

    0    b"MOEP", u32 version, u64 n (values), u64 m (escapes), u32 coded (1) or raw (0), u32 0, u8 table[16]
    64   coded: codes [ceil(n / 2)] (value i in nibble i % 2 of byte i // 2, the low nibble first), then at the
         next multiple of 64 lows [n], then at the next multiple of 64 escape positions u32 [m] and right
         after them their high bytes u8 [m]; raw: the values [2 n]
    the segment ends at a multiple of 64

A tensor whose coding would not be smaller (more escapes than :data:`MAX_ESCAPE_SHARE` of its values, or too
few values for the headers) is stored raw, so a segment is never larger than a raw one. The C source is compiled with the system's C compiler at first use into
``$VLLM_CACHE_ROOT/moe_offload/codec`` (``~/.cache/vllm`` by default); where none works, a NumPy decoder
gives the same values more slowly (logged once). No vLLM.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import struct
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger("vllm.moe_offload.packed_codec")

MAGIC = b"MOEP"
VERSION = 1
#: the header: magic, version, n, m, coded, reserved, table
_HEADER = struct.Struct("<4sIQQII16s")
#: every part of a segment starts at a multiple of this (the decoder's loads are then aligned to cache lines)
ALIGN = 64
#: the code of a high byte outside the table
ESCAPE = 15
#: a tensor with more escapes than this share of its values is stored raw: its coding would be larger than
#: 15/16 of the raw bytes (12 + 40 x share bits per value against 16)
MAX_ESCAPE_SHARE = 1 / 16

#: 2-byte dtypes the coding applies to (bfloat16's high byte is nearly all exponent; float16's too, less so)
DTYPES = (torch.bfloat16, torch.float16)


class PackedCodingError(ValueError):
    """A segment that does not decode: wrong magic or version, lengths past its buffer, an escape out of place."""


def _round(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def segment_bytes(n: int, m: int, coded: bool) -> int:
    """Bytes of a segment of ``n`` values with ``m`` escapes, coded or raw."""
    if not coded:
        return _round(ALIGN + 2 * n)
    return _round(_round(_round(ALIGN + (n + 1) // 2) + n) + 5 * m)


def max_segment_bytes(n: int) -> int:
    """The most a segment of ``n`` values can take (a raw one): what a read buffer must hold per tensor."""
    return segment_bytes(n, 0, coded=False)


def encode(values: torch.Tensor) -> bytearray:
    """One segment coding ``values`` (any shape, a 2-byte dtype), in their memory order.

    Holds about 3.5 bytes per value besides ``values`` while it runs (the segment, the codes and lows before
    they are copied into it, the high bytes): a store's build codes one expert tensor at a time."""
    if values.dtype not in DTYPES:
        raise ValueError(f"the packed coding takes {[str(d) for d in DTYPES]} values, got {values.dtype}")
    flat = values.contiguous().view(-1).view(torch.int16).numpy().view(np.uint16)  # [n]
    n = flat.size
    high = (flat >> 8).astype(np.uint8)
    counts = np.bincount(high, minlength=256)
    top = np.argsort(-counts, kind="stable")[:ESCAPE]  # the 15 most frequent high bytes
    table = np.zeros(16, dtype=np.uint8)
    table[:ESCAPE] = top
    code_of = np.full(256, ESCAPE, dtype=np.uint8)
    code_of[top] = np.arange(ESCAPE, dtype=np.uint8)
    max_escapes = int(n * MAX_ESCAPE_SHARE)
    escapes = int(counts[code_of == ESCAPE].sum())
    if escapes > max_escapes or segment_bytes(n, escapes, coded=True) >= segment_bytes(n, 0, coded=False):
        header = _HEADER.pack(MAGIC, VERSION, n, 0, 0, 0, bytes(16))
        out = bytearray(segment_bytes(n, 0, coded=False))
        out[: _HEADER.size] = header
        out[ALIGN : ALIGN + 2 * n] = memoryview(flat).cast("B")
        return out
    codes = np.empty((n + 1) // 2, dtype=np.uint8)
    lows = np.empty(n, dtype=np.uint8)
    escape_pos = np.empty(max(1, max_escapes), dtype=np.uint32)
    escape_high = np.empty(max(1, max_escapes), dtype=np.uint8)
    m = _codec().encode(flat, code_of, codes, lows, escape_pos, escape_high, max_escapes)
    out = bytearray(segment_bytes(n, m, coded=True))
    out[: _HEADER.size] = _HEADER.pack(MAGIC, VERSION, n, m, 1, 0, table.tobytes())
    at = ALIGN
    out[at : at + codes.size] = memoryview(codes)
    at = _round(at + codes.size)
    out[at : at + n] = memoryview(lows)
    at = _round(at + n)
    out[at : at + 4 * m] = memoryview(escape_pos[:m]).cast("B")
    out[at + 4 * m : at + 5 * m] = memoryview(escape_high[:m])
    return out


def decode_into(segment: torch.Tensor, out: torch.Tensor, simd: bool = True) -> int:
    """Decode the segment at the start of ``segment`` (``[bytes] uint8``, contiguous) into ``out`` (contiguous,
    a 2-byte dtype, as many values as the segment codes). Returns the segment's length in bytes.

    Raises :class:`PackedCodingError` for a segment that does not fit ``segment`` or ``out`` or is torn;
    ``out`` may then hold part of the values. ``simd`` False: the plain loop (tests compare the two).
    """
    if segment.dtype != torch.uint8 or segment.dim() != 1 or not segment.is_contiguous():
        raise ValueError(f"a segment is a contiguous [bytes] uint8 tensor, got {segment.dtype} {list(segment.shape)}")
    if out.dtype not in DTYPES or not out.is_contiguous():
        raise ValueError(f"decode into a contiguous tensor of {[str(d) for d in DTYPES]}, got {out.dtype}")
    have = segment.numel()
    if have < _HEADER.size:
        raise PackedCodingError(f"a segment of {have} bytes is shorter than its header ({_HEADER.size})")
    magic, version, n, m, coded, _, table = _HEADER.unpack(bytes(segment[: _HEADER.size].numpy()))
    if magic != MAGIC or version != VERSION:
        raise PackedCodingError(f"not a packed segment of version {VERSION}: magic {magic!r}, version {version}")
    if n != out.numel():
        raise PackedCodingError(f"the segment codes {n} values, the tensor holds {out.numel()}")
    length = segment_bytes(n, m, bool(coded))
    if length > have or m > n:
        raise PackedCodingError(f"the segment needs {length} bytes ({n} values, {m} escapes), {have} are there")
    flat = out.view(-1).view(torch.int16)  # [n]
    if not coded:
        flat.copy_(segment[ALIGN : ALIGN + 2 * n].view(torch.int16))
        return length
    codes_at = ALIGN
    lows_at = _round(codes_at + (n + 1) // 2)
    escapes_at = _round(lows_at + n)
    base = segment.data_ptr()
    table_bytes = np.frombuffer(table, dtype=np.uint8)
    status = _codec().decode(base + codes_at, base + lows_at, table_bytes, flat, n, base + escapes_at,
                             base + escapes_at + 4 * m, m, simd, segment)
    if status != 0:
        raise PackedCodingError("an escape lies outside the tensor or where no escape is coded: the segment is torn")
    return length


class _Native:
    """The compiled coder (``packed_codec.c``), called through ctypes (which releases the GIL)."""

    name = "C"

    def __init__(self, lib: ctypes.CDLL) -> None:
        ptr, i64 = ctypes.c_void_p, ctypes.c_int64
        lib.packed_decode.argtypes = [ptr, ptr, ptr, ptr, i64, ptr, ptr, i64, ctypes.c_int]
        lib.packed_decode.restype = ctypes.c_int
        lib.packed_encode.argtypes = [ptr, i64, ptr, ptr, ptr, ptr, ptr, i64]
        lib.packed_encode.restype = i64
        lib.packed_simd.restype = ctypes.c_int
        self._lib = lib
        self.simd = bool(lib.packed_simd())
        if self.simd:
            self.name = "C, AVX2"

    def decode(self, codes: int, lows: int, table: np.ndarray, out: torch.Tensor, n: int, escape_pos: int,
               escape_high: int, m: int, simd: bool, segment: torch.Tensor) -> int:
        return self._lib.packed_decode(codes, lows, table.ctypes.data, out.data_ptr(), n, escape_pos,
                                       escape_high, m, int(simd))

    def encode(self, flat: np.ndarray, code_of: np.ndarray, codes: np.ndarray, lows: np.ndarray,
               escape_pos: np.ndarray, escape_high: np.ndarray, max_escapes: int) -> int:
        m = self._lib.packed_encode(flat.ctypes.data, flat.size, code_of.ctypes.data, codes.ctypes.data,
                                    lows.ctypes.data, escape_pos.ctypes.data, escape_high.ctypes.data, max_escapes)
        if m < 0:
            raise AssertionError("more escapes than counted")  # encode() counted them first
        return m


class _NumPy:
    """The same coding in NumPy, where no C compiler works: the same values, several times slower."""

    name = "NumPy"
    simd = False

    def decode(self, codes: int, lows: int, table: np.ndarray, out: torch.Tensor, n: int, escape_pos: int,
               escape_high: int, m: int, simd: bool, segment: torch.Tensor) -> int:
        raw = segment.numpy()
        base = segment.data_ptr()
        packed = raw[codes - base : codes - base + (n + 1) // 2]
        code = np.empty(2 * packed.size, dtype=np.uint8)
        code[0::2], code[1::2] = packed & 15, packed >> 4
        code = code[:n]
        low = raw[lows - base : lows - base + n].astype(np.uint16)
        values = (table[code].astype(np.uint16) << 8) | low
        pos = raw[escape_pos - base : escape_pos - base + 4 * m].view(np.uint32).astype(np.int64)
        if m and (pos.max() >= n or (code[pos[pos < n]] != ESCAPE).any()):
            return -1
        values[pos] = (raw[escape_high - base : escape_high - base + m].astype(np.uint16) << 8) | low[pos]
        out.view(-1).numpy()[:] = values.view(np.int16)
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
