"""Reads in pieces: a large read's crc32 computed beside the read instead of after it, and a block read and
used piece by piece through one buffer.

An expert store checks the crc32 of an expert's block at its first read in a
process (``runtime/expert_store.py``). For a large expert that check cost as much
as half the read, on the I/O thread, in series with it. :class:`PiecedReads`
reads such a block in pieces and hands each piece, once read, to a checker
thread that chains the crc32 (``runtime/crc.py``) in order while the next piece
reads (both release the GIL). ``TensorReader.read_into`` uses it for checked
reads of more than :data:`PIECE_BYTES`. :func:`stream` reads a packed store's
block (``runtime/packed_codec.py``) piece by piece through one buffer of a
piece, each piece used (decoded) before the next one reads. No vLLM.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

from vllm_moe_offload.runtime.crc import crc32

if TYPE_CHECKING:
    import torch

#: a checked read (``TensorReader.read_into(checksum=True)``) of more than this many bytes goes in pieces of
#: about this size, each piece's crc32 computed on a helper thread while the next piece reads. On this project's
#: VM a 96 MiB expert read in 24-28 ms and its crc32 took 14-16 ms more on the I/O thread (the first read of
#: every expert checks it, so a fresh engine's first requests waited for both); 8 MiB pieces read at the same
#: rate as one read. Smaller reads are checked after the read, on the reading thread (a 3 MiB expert's crc32,
#: 0.3 ms with ISA-L's, 1.4 with zlib's on the Xeon, costs less than handing it over)
PIECE_BYTES = 8 * 2**20

#: one run of a read: (start within the read, bytes, the part's tensor it lands in, or None: the read buffer)
Segment = tuple[int, int, "torch.Tensor | None"]


class PiecedReads:
    """Checked reads in pieces for one reader (one I/O thread); its checker thread is made at the first."""

    def __init__(self) -> None:
        self._checker: ThreadPoolExecutor | None = None

    def read(
        self, fd: int, lo: int, segments: list[Segment], views: list[memoryview], first: int, last: int, align: int,
    ) -> tuple[int, int]:
        """Read ``segments`` (landing in ``views``) at file offset ``lo`` in pieces; ``(bytes read, crc32)``.

        The crc32 covers the read's bytes ``[first, last)`` in file order, as one
        read's would. Each piece is handed to the checker thread once read, and the
        next piece reads meanwhile (``crc32`` and ``os.preadv`` both release
        the GIL); the checker takes pieces in order, so the crc chains as over one
        buffer. Stops at a short piece (the file's end): the caller checks the
        total. Returns only when the checker is done with every piece, so the
        views may be released.
        """
        if self._checker is None:
            self._checker = ThreadPoolExecutor(1, thread_name_prefix="moe-offload-crc")
        crc = 0

        def check(start: int, piece: list[memoryview]) -> None:
            nonlocal crc
            for view in piece:
                crc = crc_within(crc, start, view, first, last)
                start += len(view)

        got = 0
        checks: list[Future] = []
        pieces = _pieces(segments, views, PIECE_BYTES, align)
        try:
            for start, piece in pieces:
                wanted = sum(len(view) for view in piece)
                n = os.preadv(fd, piece, lo + start)
                got += n
                checks.append(self._checker.submit(check, start, piece))
                if n < wanted:
                    break
        finally:
            for done in checks:
                done.exception()  # waits; a failure is raised below, once every check is over
            for _, piece in pieces:
                for view in piece:
                    view.release()
        for done in checks:
            done.result()
        return got, crc

    def close(self) -> None:
        if self._checker is not None:
            self._checker.shutdown(wait=True)
            self._checker = None


def stream(
    fd: int, lo: int, length: int, buffer: memoryview, align: int, use: Callable[[int, memoryview], None],
) -> int:
    """``use(start, piece)`` on the file's ``length`` bytes at offset ``lo`` (aligned to ``align``), in
    order, in pieces of ``len(buffer)`` bytes (a multiple of ``align``), each read into ``buffer`` and used
    before the next one reads; returns the bytes read (the last piece's rounded up to ``align``). Raises
    ``OSError`` on a short read.

    In series, on purpose: on this project's 2-core VM, reading the next 1 MiB piece on a second thread while
    the loader decoded the one before slowed both (a 2.25 MiB packed block: 1.34-1.68 ms a load, against
    0.89-1.22 ms read whole, then decoded; each piece's decode took 0.25-0.32 ms against 0.36-0.40 for the
    whole block), and small pieces read slower than one read (``docs/bench/packed-store/``)."""
    piece_bytes, total = len(buffer), 0
    for start in range(0, length, piece_bytes):
        want = min(piece_bytes, length - start)
        with buffer[: -(-want // align) * align] as into:
            got = os.preadv(fd, [into], lo + start)
        if got < want:
            raise OSError(f"short read: wanted {want} bytes at {lo + start}, got {got}")
        total += got
        with buffer[:want] as piece:
            use(start, piece)
    return total


def crc_within(crc: int, start: int, view: memoryview, first: int, last: int) -> int:
    """``crc`` continued over the bytes of ``view`` (the read's bytes from ``start`` on) that lie in
    ``[first, last)``, the range a read was asked for (the rest is alignment around it)."""
    a, b = max(start, first), min(start + len(view), last)
    if a >= b:
        return crc
    with view[a - start : b - start] as part:
        return crc32(part, crc)


def _pieces(
    segments: list[Segment], views: list[memoryview], piece_bytes: int, align: int,
) -> list[tuple[int, list[memoryview]]]:
    """One read's ``views`` (of ``segments``, consecutive from 0) cut into pieces of about ``piece_bytes``.

    Returns ``(start within the read, views)`` per piece, in order. A part's
    segment is cut only at multiples of ``align`` from its start (aligned there,
    so every cut stays aligned for direct I/O); a segment of the read buffer
    (padding, small parts) is never cut. The views are new slices: release them.
    """
    pieces: list[tuple[int, list[memoryview]]] = []
    piece: list[memoryview] = []
    piece_start = size = 0
    for (start, num, tensor), view in zip(segments, views):
        at = 0
        while at < num:
            take = num - at
            room = piece_bytes - size
            if tensor is not None and take > room:
                take = room - room % align
            if take > 0:
                piece.append(view[at : at + take])
                size += take
                at += take
            if size >= piece_bytes or (take <= 0 and piece):
                pieces.append((piece_start, piece))
                piece_start, piece, size = piece_start + size, [], 0
    if piece:
        pieces.append((piece_start, piece))
    return pieces
