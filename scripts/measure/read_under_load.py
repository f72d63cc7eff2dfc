"""Micro-benchmark (not a test): how much busy cores slow a direct expert read (the other way from io_contention.py).

    python scripts/measure/read_under_load.py FILE [--read-bytes 96MiB] [--reads 12] [--json OUT]

Reads ``--read-bytes`` blocks of FILE (an expert store's or a checkpoint's file of at least two blocks) with
direct I/O into one buffer of transparent huge pages, as the offload loader reads into its slots, ``--reads``
times per condition at spread offsets, and prints the median and fastest read of each condition:

* idle: nothing else running (of this script's);
* N CPU spinners: N processes that only spin on the CPU (no memory traffic);
* N memory streamers: N processes that copy 64 MiB arrays back to back (the memory traffic of a kernel that
  streams expert weights, without its arithmetic).

On a machine with as many cores as spinners, the reads then share the cores with them. In
``docs/bench/prompt-step/`` (a 2-vCPU VM) a 96 MiB read took about 1.5x as long beside two spinners or two
streamers and no longer beside one streamer: what slows a read beside the kernel there is both vCPUs
being busy, not the memory traffic.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

_SPIN = "while True: pass"
_STREAM = "import numpy as np\na = np.ones((64 << 20) // 8)\nb = np.empty_like(a)\nwhile True: np.copyto(b, a)"
_HUGE = 2 << 20


def _size(text: str) -> int:
    units = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def _buffer(size: int) -> tuple[mmap.mmap, memoryview]:
    """``size`` bytes of anonymous memory, 2 MiB-aligned and advised into huge pages, touched once."""
    raw = mmap.mmap(-1, size + _HUGE)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        raw.madvise(mmap.MADV_HUGEPAGE)
    address = ctypes.addressof(ctypes.c_char.from_buffer(raw))
    start = (-address) % _HUGE
    view = memoryview(raw)[start:start + size]
    view[:] = bytes(size)
    return raw, view


def _reads(fd: int, view: memoryview, file_size: int, count: int) -> list[float]:
    """``count`` direct reads of ``len(view)`` bytes at offsets spread over the file; milliseconds each."""
    size = len(view)
    blocks = file_size // size
    out = []
    for i in range(count):
        offset = ((i * 7919) % blocks) * size
        started = time.perf_counter()
        got = os.preadv(fd, [view], offset)
        out.append((time.perf_counter() - started) * 1e3)
        if got != size:
            raise SystemExit(f"short read at {offset}: {got} of {size} bytes")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", type=Path, help="a file of at least two blocks (an expert store's shard)")
    parser.add_argument("--read-bytes", default="96MiB", help="bytes per read, a multiple of 4 KiB (default 96MiB)")
    parser.add_argument("--reads", type=int, default=12, help="reads per condition (default 12)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    size = _size(args.read_bytes)
    if size <= 0 or size % 4096:
        parser.error("--read-bytes must be a positive multiple of 4 KiB (direct I/O)")
    if args.reads < 1:
        parser.error("--reads must be at least 1")
    file_size = args.file.stat().st_size
    if file_size < 2 * size:
        parser.error(f"{args.file} holds {file_size} bytes; at least two reads' worth ({2 * size}) are needed")
    fd = os.open(args.file, os.O_RDONLY | os.O_DIRECT)
    _raw, view = _buffer(size)
    cores = os.cpu_count() or 1
    conditions = [("idle", None, 0)]
    for n in sorted({1, cores}):
        conditions += [(f"{n} CPU spinner{'s' * (n > 1)}", _SPIN, n), (f"{n} memory streamer{'s' * (n > 1)}", _STREAM, n)]
    conditions.append(("idle again", None, 0))
    results = []
    print(f"{args.file}: {args.reads} direct reads of {size / 2**20:.1f} MiB per condition, {cores} CPUs")
    for name, code, count in conditions:
        procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(count)]
        try:
            if procs:
                time.sleep(1.0)  # the streamers allocate first
            times = _reads(fd, view, file_size, args.reads)
        finally:
            for proc in procs:
                proc.kill()
                proc.wait()
        median = statistics.median(times)
        results.append({"condition": name, "median_ms": median, "min_ms": min(times), "max_ms": max(times),
                        "gbps": size / (median / 1e3) / 1e9})
        print(f"  {name:22s} median {median:7.1f} ms (fastest {min(times):.1f}, slowest {max(times):.1f}), "
              f"{results[-1]['gbps']:.2f} GB/s")
    os.close(fd)
    if args.json:
        args.json.write_text(json.dumps({"file": str(args.file), "read_bytes": size, "reads": args.reads,
                                         "cpus": cores, "results": results}, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
