"""Read single tensors out of a safetensors checkpoint, with direct I/O.

A safetensors file is an 8-byte little-endian header length, a JSON header
(name -> dtype, shape, data_offsets relative to the end of the header), then the
data. We parse the headers ourselves so that a tensor's byte range is known and
can be read with ``O_DIRECT`` into a page-aligned buffer: the page cache never
holds the bytes, so every read costs what the disk costs.

Where the filesystem refuses ``O_DIRECT`` (tmpfs, some overlay mounts) reads
fall back to buffered ``pread`` and a warning is logged once per file.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger("vllm.moe_offload.safetensors_io")

#: O_DIRECT needs offsets, lengths and buffer addresses aligned to the logical
#: block size; 4 KiB covers every disk and filesystem we run on.
ALIGN_BYTES = 4096

_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorLocation:
    """Where one tensor's bytes live."""

    path: str
    offset: int  # absolute byte offset in the file
    num_bytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


class CheckpointIndex:
    """Name -> :class:`TensorLocation` over every ``*.safetensors`` file of a folder."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors files in {self.folder}")
        self._where: dict[str, TensorLocation] = {}
        #: path -> (size, mtime) when indexed: a read from a file that changed since is refused
        self._stamps: dict[str, tuple[int, int]] = {}
        for path in files:
            self._where.update(_read_header(path))
            self._stamps[str(path)] = _stamp(os.stat(path))

    def problem(self, name: str) -> str | None:
        """Why tensor ``name`` cannot be read as indexed (missing, truncated, malformed), or None."""
        loc = self._where.get(name)
        if loc is None:
            return f"{name} is missing"
        size = self._stamps[loc.path][0]
        if loc.offset + loc.num_bytes > size:
            return f"{name} in {loc.path} is truncated (needs bytes up to {loc.offset + loc.num_bytes}, file has {size})"
        want = loc.dtype.itemsize
        for dim in loc.shape:
            want *= dim
        if want != loc.num_bytes:
            return f"{name} in {loc.path} is malformed (shape {loc.shape} needs {want} bytes, header says {loc.num_bytes})"
        return None

    def check_unchanged(self, path: str, now: os.stat_result) -> None:
        """Raise ``OSError`` when ``path`` was truncated or rewritten after it was indexed.

        The offsets of the index would then point at other bytes: an expert read
        from them would be torn, so it is never used.
        """
        then = self._stamps[path]
        if _stamp(now) != then:
            raise OSError(
                f"{path} changed after start-up (size {then[0]} -> {now.st_size} bytes, "
                f"mtime {then[1]} -> {now.st_mtime_ns} ns); experts are not read from a changed checkpoint"
            )

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def __getitem__(self, name: str) -> TensorLocation:
        try:
            return self._where[name]
        except KeyError:
            raise KeyError(f"tensor {name!r} is not in the checkpoint at {self.folder}") from None

    def names(self) -> list[str]:
        return list(self._where)


def _stamp(st: os.stat_result) -> tuple[int, int]:
    return st.st_size, st.st_mtime_ns


def _read_header(path: Path) -> dict[str, TensorLocation]:
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    base = 8 + header_len
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        dtype = _DTYPES.get(meta["dtype"])
        if dtype is None:
            continue  # dtypes the experts never use (e.g. F8) are simply not indexed
        out[name] = TensorLocation(str(path), base + start, end - start, dtype, tuple(meta["shape"]))
    return out


class TensorReader:
    """Reads tensors by location; one instance per I/O thread (it owns a buffer)."""

    def __init__(self, direct_io: bool = True) -> None:
        self.direct_io = direct_io
        self._buffer: mmap.mmap | None = None
        self._fds: dict[tuple[str, bool], int] = {}
        self._warned: set[str] = set()
        self.bytes_read = 0

    def read(self, locations: list[TensorLocation]) -> list[torch.Tensor]:
        """Read tensors that sit in one file; returns fresh tensors (copies).

        Neighbouring tensors are read with one request covering their span, so
        an expert's three projections usually cost one read.
        """
        if not locations:
            return []
        paths = {loc.path for loc in locations}
        if len(paths) > 1:
            return [t for loc in locations for t in self.read([loc])]
        path = locations[0].path
        start = min(loc.offset for loc in locations)
        end = max(loc.offset + loc.num_bytes for loc in locations)
        span = self._read_span(path, start, end)  # memoryview of [start, end)
        out = []
        for loc in locations:
            rel = loc.offset - start
            raw = span[rel : rel + loc.num_bytes]
            out.append(torch.frombuffer(bytearray(raw), dtype=loc.dtype).reshape(loc.shape))
        return out

    def _read_span(self, path: str, start: int, end: int) -> memoryview:
        fd, direct = self._open(path)
        if direct:
            lo = start - start % ALIGN_BYTES
            hi = -(-end // ALIGN_BYTES) * ALIGN_BYTES
            buf = self._aligned(hi - lo)
            view = memoryview(buf)[: hi - lo]
            try:
                got = os.preadv(fd, [view], lo)
            except OSError as exc:
                self._fallback(path, exc)
                return self._read_span(path, start, end)
            if got < end - lo:
                raise OSError(f"short read from {path}: wanted {end - lo} bytes at {lo}, got {got}")
            self.bytes_read += got
            return view[start - lo : end - lo]
        data = os.pread(fd, end - start, start)
        if len(data) != end - start:
            raise OSError(f"short read from {path}: wanted {end - start} bytes at {start}, got {len(data)}")
        self.bytes_read += len(data)
        return memoryview(data)

    def stat(self, path: str) -> os.stat_result:
        """``fstat`` of the descriptor this reader reads ``path`` through."""
        fd, _ = self._open(path)
        return os.fstat(fd)

    def _open(self, path: str) -> tuple[int, bool]:
        direct = self.direct_io and path not in self._warned and hasattr(os, "O_DIRECT")
        key = (path, direct)
        if key not in self._fds:
            try:
                flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
                self._fds[key] = os.open(path, flags)
            except OSError as exc:
                if not direct:
                    raise
                self._fallback(path, exc)
                return self._open(path)
        return self._fds[key], direct

    def _fallback(self, path: str, exc: OSError) -> None:
        if path not in self._warned:
            logger.warning(
                "direct I/O refused for %s (%s); reading it through the page cache instead, "
                "so measured read costs will be optimistic", path, exc,
            )
        self._warned.add(path)

    def _aligned(self, num_bytes: int) -> mmap.mmap:
        # Anonymous mmaps are page-aligned, which satisfies O_DIRECT.
        if self._buffer is None or len(self._buffer) < num_bytes:
            if self._buffer is not None:
                self._buffer.close()
            self._buffer = mmap.mmap(-1, max(num_bytes, ALIGN_BYTES))
        return self._buffer

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        if self._buffer is not None:
            self._buffer.close()
            self._buffer = None


class ThreadLocalReaders:
    """One :class:`TensorReader` per thread (buffers are not shareable)."""

    def __init__(self, direct_io: bool) -> None:
        self.direct_io = direct_io
        self._local = threading.local()
        self._all: list[TensorReader] = []
        self._lock = threading.Lock()

    def get(self) -> TensorReader:
        reader = getattr(self._local, "reader", None)
        if reader is None:
            reader = TensorReader(self.direct_io)
            self._local.reader = reader
            with self._lock:
                self._all.append(reader)
        return reader

    def close(self) -> None:
        with self._lock:
            for reader in self._all:
                reader.close()
            self._all.clear()
