"""Reads in pieces: a large read's crc32 computed beside the read instead of after it, and a block used
piece by piece while the next piece reads.

An expert store checks the crc32 of an expert's block at its first read in a
process (``runtime/expert_store.py``). For a large expert that check cost as much
as half the read, on the I/O thread, in series with it. :class:`PiecedReads`
reads such a block in pieces and hands each piece, once read, to a checker
thread that chains the crc32 (``runtime/crc.py``) in order while the next piece
reads (both release the GIL). ``TensorReader.read_into`` uses it for checked
reads of more than :data:`PIECE_BYTES`. :meth:`PiecedReads.stream` turns it
around for a packed store's blocks (``runtime/packed_codec.py``): a reader
thread reads the next piece while the caller decodes the one before, through
two buffers. No vLLM.
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
    """Reads in pieces for one reader (one I/O thread); its checker and reader threads are made at their first
    use."""

    def __init__(self) -> None:
        self._checker: ThreadPoolExecutor | None = None
        self._reader: ThreadPoolExecutor | None = None

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

    def stream(
        self, fd: int, lo: int, length: int, buffers: tuple[memoryview, memoryview], align: int,
        use: Callable[[int, memoryview], None],
    ) -> int:
        """``use(start, piece)`` on the file's ``length`` bytes at offset ``lo`` (aligned to ``align``), in
        order, in pieces of ``len(buffers[0])`` bytes (a multiple of ``align``); returns the bytes read (the
        last piece's rounded up to ``align``).

        Piece ``i`` lands in ``buffers[i % 2]``; while ``use`` runs on it (on the calling thread), the reader
        thread reads piece ``i + 1`` into the other buffer (``os.preadv`` releases the GIL, and so should
        ``use``). The last piece is read rounded up to ``align`` and handed over at its length. Raises
        ``OSError`` on a short read; whatever ``use`` raises, after the read in flight is over (the buffers
        may then be reused)."""
        piece_bytes = len(buffers[0])
        starts = range(0, length, piece_bytes)

        def read(i: int) -> tuple[int, int]:
            start = starts[i]
            want = min(piece_bytes, length - start)
            with buffers[i % 2][: -(-want // align) * align] as into:
                got = os.preadv(fd, [into], lo + start)
            if got < want:
                raise OSError(f"short read: wanted {want} bytes at {lo + start}, got {got}")
            return want, got

        if len(starts) == 1:  # one piece: nothing to overlap, no hand-over
            want, got = read(0)
            with buffers[0][:want] as piece:
                use(0, piece)
            return got
        if self._reader is None:
            self._reader = ThreadPoolExecutor(1, thread_name_prefix="moe-offload-read")
        ahead: Future | None = self._reader.submit(read, 0)
        total = 0
        try:
            for i, start in enumerate(starts):
                want, got = ahead.result()
                total += got
                ahead = self._reader.submit(read, i + 1) if i + 1 < len(starts) else None
                with buffers[i % 2][:want] as piece:
                    use(start, piece)
        finally:
            if ahead is not None:
                ahead.exception()  # waits: the buffers are the caller's again only when no read is left
        return total

    def close(self) -> None:
        for pool in (self._checker, self._reader):
            if pool is not None:
                pool.shutdown(wait=True)
        self._checker = self._reader = None


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
