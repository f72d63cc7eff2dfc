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

import contextlib
import errno
import json
import math
import logging
import mmap
import os
import re
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from vllm_moe_offload.core.plan import HUGE_PAGE_BYTES, READ_ALIGN_BYTES, buffer_bytes, round_up
from vllm_moe_offload.runtime import checked_read
from vllm_moe_offload.runtime.checked_read import PiecedReads, Segment, crc_within
from vllm_moe_offload.runtime.ledger import BudgetLedger, MemoryKind
from vllm_moe_offload.runtime.memory import huge_page_map, is_aligned

logger = logging.getLogger("vllm.moe_offload.safetensors_io")

#: O_DIRECT alignment (see core/plan.py, which sizes the read buffers with it)
ALIGN_BYTES = READ_ALIGN_BYTES
#: the most bytes of other tensors one read may skip over to take neighbours in one request;
#: farther apart, they are read separately (the buffer never grows to cover unrelated tensors)
MAX_READ_GAP_BYTES = READ_ALIGN_BYTES
#: a routed expert's tensors: "<prefix>.experts.<e>.<proj>.weight" (shared experts have no index)
_EXPERT_NAME = re.compile(r"^(.*\.experts\.\d+)\.")

_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
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

    def expert_slice(self, name: str, expert_idx: int) -> TensorLocation:
        """Expert ``expert_idx``'s part of tensor ``name``, whose first dimension is the experts' [E, ...].

        One contiguous range, ``offset + expert_idx * (bytes / E)``, of shape ``[...]``:
        one read, however many experts the tensor holds.
        """
        loc = self[name]
        if len(loc.shape) < 2 or not 0 <= expert_idx < loc.shape[0]:
            raise IndexError(f"{name} {list(loc.shape)} has no expert {expert_idx} along its first dimension")
        per_expert = loc.num_bytes // loc.shape[0]
        return TensorLocation(loc.path, loc.offset + expert_idx * per_expert, per_expert, loc.dtype, loc.shape[1:])

    def largest_expert_span(self) -> int | None:
        """The largest single read of one routed expert's tensors (bytes); None without routed experts.

        What a read buffer must hold: reads are grouped as :meth:`TensorReader.read` groups them.
        """
        experts: dict[str, list[TensorLocation]] = {}
        for name, loc in self._where.items():
            if m := _EXPERT_NAME.match(name):
                experts.setdefault(m.group(1), []).append(loc)
        spans = [span_bytes(group) for locs in experts.values() for group in read_groups(locs)]
        return max(spans, default=None)


def read_groups(locations: list[TensorLocation]) -> list[list[TensorLocation]]:
    """``locations`` split into reads: neighbours in one file, at most ``MAX_READ_GAP_BYTES`` apart."""
    groups: list[list[TensorLocation]] = []
    for loc in sorted(locations, key=lambda loc: (loc.path, loc.offset)):
        last = groups[-1][-1] if groups else None
        if last is not None and last.path == loc.path and loc.offset - _end(last) <= MAX_READ_GAP_BYTES:
            groups[-1].append(loc)
        else:
            groups.append([loc])
    return groups


def span_bytes(group: list[TensorLocation]) -> int:
    return max(_end(loc) for loc in group) - min(loc.offset for loc in group)


def _end(loc: TensorLocation) -> int:
    return loc.offset + loc.num_bytes


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
            continue  # dtypes the experts never use (e.g. F4) are simply not indexed
        out[name] = TensorLocation(str(path), base + start, end - start, dtype, tuple(meta["shape"]))
    return out


class ReadBuffers:
    """At most ``count`` page-aligned read buffers, lent to readers one read at a time.

    A buffer grows to the largest read it serves; the growth is reserved in
    ``ledger`` (when given) before the new buffer is mapped, so the read
    buffers never take the plugin past its budget. A buffer of a huge page or
    more is a whole number of huge pages, in huge pages (``memory.huge_page_map``):
    the checkpoint's experts are read into it, and there a 3 MiB direct read took
    0.8-1.0 ms against 2.1-2.4 into small pages (one 4 MiB buffer, reused).
    """

    def __init__(self, count: int = 1, ledger: BudgetLedger | None = None) -> None:
        if count < 1:
            raise ValueError(f"need at least one read buffer, got {count}")
        self.ledger = ledger
        self._free: list[mmap.mmap | None] = [None] * count
        self._available = threading.Semaphore(count)
        self._lock = threading.Lock()

    @contextmanager
    def borrow(self, num_bytes: int) -> Iterator[mmap.mmap]:
        """A buffer of at least ``num_bytes``, this caller's until the ``with`` block ends."""
        with self._available:
            with self._lock:
                buf = self._free.pop()
            try:
                have = len(buf) if buf is not None else 0
                if have < num_bytes:
                    want = buffer_bytes(max(num_bytes, ALIGN_BYTES))  # as core/plan.py reserves it
                    if self.ledger is not None:  # raises past the budget, before anything changes
                        what = f"growing a read buffer to {want} bytes"
                        self.ledger.reserve(MemoryKind.READ_BUFFER, want - have, what)
                    if buf is not None:
                        buf.close()
                        buf = None
                    try:
                        # anonymous maps are page-aligned, which satisfies O_DIRECT
                        buf = huge_page_map(want) if want >= HUGE_PAGE_BYTES else mmap.mmap(-1, want)
                    except BaseException:
                        if self.ledger is not None:
                            self.ledger.release(MemoryKind.READ_BUFFER, want)
                        raise
                yield buf
            finally:
                with self._lock:
                    self._free.append(buf)

    @property
    def held_bytes(self) -> int:
        """Bytes of the buffers not lent out at the moment."""
        with self._lock:
            return sum(len(b) for b in self._free if b is not None)

    def close(self) -> None:
        with self._lock:
            for i, buf in enumerate(self._free):
                if buf is not None:
                    num_bytes = len(buf)
                    buf.close()
                    if self.ledger is not None:
                        self.ledger.release(MemoryKind.READ_BUFFER, num_bytes)
                self._free[i] = None


class TensorReader:
    """Reads tensors by location; one instance per thread (it owns its file descriptors).

    Direct reads go through a buffer of ``buffers`` (its own single one when not given).
    """

    def __init__(self, direct_io: bool = True, buffers: ReadBuffers | None = None) -> None:
        self.direct_io = direct_io
        self._own_buffers = buffers is None
        self._buffers = ReadBuffers(1) if buffers is None else buffers
        self._fds: dict[tuple[str, bool], int] = {}
        self._warned: set[str] = set()
        self._checked = PiecedReads()  # checked reads of more than a piece (its thread made at the first)
        self.bytes_read = 0

    def read(self, locations: list[TensorLocation]) -> list[torch.Tensor]:
        """Read tensors; returns fresh tensors (copies), in the order of ``locations``.

        Neighbouring tensors of one file are read with one request covering
        their span (see :func:`read_groups`), so an expert's three projections
        usually cost one read.
        """
        got: dict[int, torch.Tensor] = {}
        for group in read_groups(locations):
            for loc, tensor in zip(group, self._read_group(group)):
                got[id(loc)] = tensor
        return [got[id(loc)] for loc in locations]

    def read_then(
        self, locations: list[TensorLocation], use: Callable[[list[torch.Tensor]], Sequence[torch.Tensor]],
    ) -> tuple[torch.Tensor, ...]:
        """``use(tensors)`` on the tensors at ``locations``, read without copying them where possible.

        When the tensors lie within one read (an expert's projections usually
        do) and direct I/O is on, they are views of this reader's read buffer,
        valid only inside ``use``; whatever ``use`` returns that still lies in
        the buffer is copied out. This saves a fresh copy of every read, whose
        allocation page-faults (the mmap threshold is fixed, runtime/memory.py):
        measured here, 3.2 instead of 1.9 ms per 3 MiB expert on a loader
        thread. Otherwise ``use`` gets fresh copies, as from :meth:`read`.
        """
        groups = read_groups(locations)
        if len(groups) == 1:
            with self._direct(groups[0]) as span:
                if span is not None:
                    view, lo = span
                    by_loc = {id(loc): t for loc, t in zip(groups[0], _views(view, lo, groups[0]))}
                    out = use([by_loc[id(loc)] for loc in locations])
                    whole = torch.frombuffer(view, dtype=torch.uint8)  # [span bytes]
                    inside = range(whole.data_ptr(), whole.data_ptr() + whole.numel())
                    # the buffer serves the next read: nothing returned may stay in it
                    return tuple(t.clone() if t.untyped_storage().data_ptr() in inside else t for t in out)
        return tuple(use(self.read(locations)))

    def read_into(
        self, path: str, offset: int, length: int, parts: Sequence[tuple[int, torch.Tensor]], checksum: bool = False,
    ) -> int | None:
        """Read the file's ``length`` bytes at ``offset`` into ``parts``, ``(where in the range, tensor)`` each.

        Each part receives ``tensor.nbytes`` bytes from ``offset + where`` on. With
        direct I/O, a part that is aligned memory of whole blocks at an aligned file
        offset (``memory.is_aligned``) is read straight into its tensor: no staging
        buffer, no copy. The rest of the range (padding between parts, parts that
        are not aligned) is read into a borrowed read buffer of just those blocks,
        and those parts are copied out of it. One ``preadv`` reads the range.
        Returns the crc32 of the range's bytes when ``checksum``, else None;
        raises ``OSError`` on a short read.
        """
        ends = sorted((where, where + tensor.nbytes) for where, tensor in parts)
        for (_, end), (start, _) in zip(ends, ends[1:]):
            if start < end:
                raise ValueError(f"parts overlap: one ends at byte {end}, the next starts at {start}")
        if ends and (ends[0][0] < 0 or ends[-1][1] > length):
            raise ValueError(f"parts span bytes {ends[0][0]}..{ends[-1][1]}, outside the {length} bytes read")
        got = self._read_into(path, offset, length, parts, checksum)
        if got is _REFUSED:  # O_DIRECT refused at the read (some file systems accept only the open)
            got = self._read_into(path, offset, length, parts, checksum)
        return got

    def read_streamed(
        self, path: str, offset: int, length: int, piece_bytes: int, use: Callable[[int, memoryview], None],
    ) -> None:
        """``use(start, piece)`` on the file's ``length`` bytes at ``offset``, in order, in pieces of
        ``piece_bytes`` (a multiple of the direct-I/O alignment) read one after the other into one borrowed
        read buffer (``checked_read.stream``); a piece is valid only inside ``use``. Raises ``OSError`` on a
        short read."""
        if piece_bytes % ALIGN_BYTES:
            raise ValueError(f"pieces of {piece_bytes} bytes: not a multiple of {ALIGN_BYTES}")
        fd, direct = self._open(path)
        align = ALIGN_BYTES if direct else 1
        if direct and offset % align:
            raise ValueError(f"a streamed direct read starts at a multiple of {align} bytes, not at {offset}")
        used = 0

        def counted(start: int, piece: memoryview) -> None:
            nonlocal used
            used += 1
            use(start, piece)

        piece_bytes = min(piece_bytes, round_up(length, align))  # a short range borrows no more than it reads
        with self._buffers.borrow(piece_bytes) as buf, memoryview(buf) as whole, whole[:piece_bytes] as buffer:
            try:
                self.bytes_read += checked_read.stream(fd, offset, length, buffer, align, counted)
            except OSError as exc:
                if not direct or exc.errno != errno.EINVAL or used:
                    raise
                self._fallback(path, exc)  # O_DIRECT refused at the first read: again, buffered
                self.bytes_read += checked_read.stream(self._open(path)[0], offset, length, buffer, 1, use)

    def _read_into(self, path, offset, length, parts, checksum):
        fd, direct = self._open(path)
        align = ALIGN_BYTES if direct else 1
        lo = offset - offset % align  # a range that starts inside a block is read from the block's start
        first, last = offset - lo, offset - lo + length  # the range within the read
        segments, copied = _plan_read(parts, first, last, align)
        staged_bytes = sum(num for _, num, tensor in segments if tensor is None)
        with contextlib.ExitStack() as stack:
            staging = None
            if staged_bytes:
                staging = memoryview(stack.enter_context(self._buffers.borrow(staged_bytes)))
                stack.callback(staging.release)
            at_in_staging, used = {}, 0  # staged segment start -> where it lies in the buffer
            for start, num, tensor in segments:
                if tensor is None:
                    at_in_staging[start] = used
                    used += num

            def segment(start: int, num: int, tensor: torch.Tensor | None) -> memoryview:
                """Where a segment of the read lands: its part's memory, or its place in the buffer."""
                if tensor is not None:
                    return _writable(tensor)
                return staging[at_in_staging[start] : at_in_staging[start] + num]

            def staged(start: int, num: int) -> memoryview:
                """The read's bytes [start, start + num), which lie in one staged segment."""
                seg = max(s for s in at_in_staging if s <= start)
                return staging[at_in_staging[seg] + start - seg :][:num]

            views = [segment(*seg) for seg in segments]
            crc = None
            try:
                if checksum and last > checked_read.PIECE_BYTES:
                    got, crc = self._checked.read(fd, lo, segments, views, first, last, align)
                else:
                    got = os.preadv(fd, views, lo)
            except OSError as exc:
                if not direct or exc.errno != errno.EINVAL:
                    raise
                self._fallback(path, exc)
                return _REFUSED
            finally:
                for view in views:
                    view.release()
            if got < last:
                raise OSError(f"short read from {path}: wanted {last} bytes at {lo}, got {got}")
            self.bytes_read += got
            for start, tensor in copied:
                with staged(start, tensor.nbytes) as src:
                    tensor.copy_(torch.frombuffer(src, dtype=torch.uint8).view(tensor.dtype).view(tensor.shape))
            if not checksum or crc is not None:
                return crc
            crc = 0
            for start, num, tensor in segments:
                with segment(start, num, tensor) as whole:
                    crc = crc_within(crc, start, whole, first, last)
            return crc

    def _read_group(self, group: list[TensorLocation]) -> list[torch.Tensor]:
        start = min(loc.offset for loc in group)
        end = max(_end(loc) for loc in group)
        with self._direct(group) as span:
            if span is not None:
                view, lo = span
                return _copies(view[start - lo : end - lo], start, group)
        path = group[0].path
        data = os.pread(self._open(path)[0], end - start, start)
        if len(data) != end - start:
            raise OSError(f"short read from {path}: wanted {end - start} bytes at {start}, got {len(data)}")
        self.bytes_read += len(data)
        return _copies(memoryview(data), start, group)

    @contextmanager
    def _direct(self, group: list[TensorLocation]) -> Iterator[tuple[memoryview, int] | None]:
        """``group``'s span read with O_DIRECT into a borrowed buffer: ``(view, file offset of view[0])``.

        None where the file is not read directly (direct I/O off, or refused:
        then the caller reads it buffered). The view is released when the block
        ends: a mapped buffer cannot be closed or regrown while a view of it lives.
        """
        path = group[0].path
        fd, direct = self._open(path)
        if not direct:
            yield None
            return
        start, end = min(loc.offset for loc in group), max(_end(loc) for loc in group)
        lo, hi = start - start % ALIGN_BYTES, round_up(end, ALIGN_BYTES)
        with self._buffers.borrow(hi - lo) as buf:
            view = memoryview(buf)[: hi - lo]
            try:
                try:
                    got = os.preadv(fd, [view], lo)
                except OSError as exc:
                    self._fallback(path, exc)
                    got = None
                if got is not None:
                    if got < end - lo:
                        raise OSError(f"short read from {path}: wanted {end - lo} bytes at {lo}, got {got}")
                    self.bytes_read += got
                yield None if got is None else (view, lo)
            finally:
                view.release()

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

    def close(self) -> None:
        self._checked.close()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        if self._own_buffers:
            self._buffers.close()


#: ``TensorReader._read_into``: direct I/O was refused at the read; read again (buffered)
_REFUSED = object()




def _plan_read(
    parts: Sequence[tuple[int, torch.Tensor]], first: int, last: int, align: int,
) -> tuple[list[Segment], list[tuple[int, torch.Tensor]]]:
    """How one read of ``[0, round_up(last, align))`` fills ``parts`` (range ``[first, last)``, ``where`` in it).

    Returns the read's segments in order, each straight into an aligned part or
    into the buffer (everything else, whole blocks at a time), and the parts to
    copy out of the buffer afterwards, as ``(start within the read, tensor)``.
    """
    segments: list[Segment] = []
    copied: list[tuple[int, torch.Tensor]] = []
    pos = 0
    for where, tensor in sorted(parts, key=lambda part: part[0]):
        start = first + where
        if not (is_aligned(tensor, align) and start % align == 0):
            copied.append((start, tensor))
            continue
        if start > pos:
            segments.append((pos, start - pos, None))
        segments.append((start, tensor.nbytes, tensor))
        pos = start + tensor.nbytes
    if round_up(last, align) > pos:
        segments.append((pos, round_up(last, align) - pos, None))
    return segments, copied


def _writable(tensor: torch.Tensor) -> memoryview:
    """The bytes of contiguous CPU ``tensor``, as a writable memoryview (a read lands in the tensor)."""
    return memoryview(tensor.view(-1).view(torch.uint8).numpy()).cast("B")


def _copies(span: memoryview, start: int, group: list[TensorLocation]) -> list[torch.Tensor]:
    """Fresh tensors of ``group`` out of ``span``, the file's bytes from offset ``start``."""
    out = []
    for loc in group:
        rel = loc.offset - start
        out.append(torch.frombuffer(bytearray(span[rel : rel + loc.num_bytes]), dtype=loc.dtype).reshape(loc.shape))
    return out


def _views(buf: memoryview, start: int, group: list[TensorLocation]) -> list[torch.Tensor]:
    """Tensors of ``group`` viewing ``buf``, which holds the file's bytes from offset ``start``."""
    return [
        torch.frombuffer(buf, dtype=loc.dtype, count=loc.num_bytes // loc.dtype.itemsize,
                         offset=loc.offset - start).view(loc.shape)
        for loc in group
    ]


class _Lane:
    """One I/O lane's conversion scratch, reused by fetch after fetch while the lane lives."""

    def __init__(self) -> None:
        self.scratch: dict[str, torch.Tensor] = {}  # name -> [bytes] uint8
        self.unspent = 0  # bytes of the running fetch's conversion hold not yet turned into scratch

    @property
    def scratch_bytes(self) -> int:
        return sum(t.nbytes for t in self.scratch.values())


class ThreadLocalReaders:
    """One :class:`TensorReader` per thread, and the staging every expert fetch goes through.

    ``lanes`` fetches (one per I/O thread) run at a time, whichever threads
    make them: each borrows one of ``lanes`` read buffers per read and one of
    ``lanes`` lanes, whose conversion scratch (:meth:`scratch`) it reuses; while
    it converts it holds ``convert_bytes`` in ``ledger``, the lane's scratch
    included (scratch stays held between fetches, the rest is released). So
    the staging never exceeds the plan's reservation.
    """

    def __init__(
        self, direct_io: bool, lanes: int = 1, ledger: BudgetLedger | None = None, convert_bytes: int = 0,
    ) -> None:
        self.direct_io = direct_io
        self.ledger = ledger
        self.convert_bytes = convert_bytes
        self.buffers = ReadBuffers(lanes, ledger)
        self._lanes = threading.Semaphore(lanes)
        self._free_lanes = [_Lane() for _ in range(lanes)]
        self._all_lanes = list(self._free_lanes)
        self._local = threading.local()
        self._all: list[TensorReader] = []
        self._lock = threading.Lock()

    def get(self) -> TensorReader:
        reader = getattr(self._local, "reader", None)
        if reader is None:
            reader = TensorReader(self.direct_io, self.buffers)
            self._local.reader = reader
            with self._lock:
                self._all.append(reader)
        return reader

    @contextmanager
    def fetching(self, what: str, convert: bool = True) -> Iterator[TensorReader]:
        """One expert fetch (read and convert): waits for a free lane, holds its conversion temporaries.

        ``convert`` False: the fetch converts nothing (a store in kernel layout), so it holds none.
        """
        with self._lanes:
            with self._lock:
                lane = self._free_lanes.pop()
            try:
                hold = max(0, self.convert_bytes - lane.scratch_bytes) if self.ledger is not None and convert else 0
                if hold:
                    self.ledger.reserve(MemoryKind.CONVERT, hold, f"converting {what}")
                lane.unspent = hold
                self._local.lane = lane
                yield self.get()
            finally:
                self._local.lane = None
                if lane.unspent:
                    self.ledger.release(MemoryKind.CONVERT, lane.unspent)
                    lane.unspent = 0
                with self._lock:
                    self._free_lanes.append(lane)

    def scratch(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A reusable ``shape`` tensor of ``dtype`` (contents undefined) of the running fetch's lane.

        Reusing it instead of allocating each expert's temporaries afresh saves
        their page faults (about 0.6 ms per 2 MiB here). It grows out of the
        fetch's conversion hold; outside a fetch it is a plain new tensor.
        """
        lane = getattr(self._local, "lane", None)
        num_bytes = math.prod(shape) * dtype.itemsize
        if lane is None:
            return torch.empty(shape, dtype=dtype)
        have = lane.scratch.get(name)
        if have is None or have.nbytes < num_bytes:
            grow = num_bytes - (have.nbytes if have is not None else 0)
            if self.ledger is not None:
                take = min(grow, lane.unspent)  # the running fetch's hold already counts these bytes
                lane.unspent -= take
                if grow > take:
                    self.ledger.reserve(MemoryKind.CONVERT, grow - take, f"growing conversion scratch {name!r}")
            lane.scratch[name] = have = torch.empty(num_bytes, dtype=torch.uint8)
        return have[:num_bytes].view(dtype).view(shape)

    def close(self) -> None:
        with self._lock:
            for reader in self._all:
                reader.close()
            self._all.clear()
            for lane in self._all_lanes:
                if self.ledger is not None and lane.scratch_bytes:
                    self.ledger.release(MemoryKind.CONVERT, lane.scratch_bytes)
                lane.scratch.clear()
        self.buffers.close()
