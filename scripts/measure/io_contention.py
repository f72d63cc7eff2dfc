"""Micro-benchmark (not a test): how much expert reads on another core slow stock vLLM's compute.

``python scripts/measure/io_contention.py MODEL --read-from DIR``: one stock engine in this
process, its compute thread on ``--compute-cpu`` (as vLLM's binding puts its worker), decodes
the same prompt greedily in rounds that alternate between a quiet machine and one where a
thread on ``--reader-cpu`` reads ``--read-bytes`` blocks with direct I/O from the files under
``--read-from`` back to back, as the offload loader does when every load follows another.
Prints each round's ms per token, the medians and their ratio, and the reader's GB/s.

Why: the bench's physical bound is max(stock's compute, the optimal cache's bytes over the
disk's bandwidth), which assumes reads cost the compute nothing. On this project's 2-core VM
reads at the disk's full rate slowed a decode on the other core by about a quarter (x1.23;
x1.35 with the compute on the core that takes the disk's interrupts; ``docs/bench/session13/``),
so a run whose link is busy cannot reach its bound by up to that much.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import statistics
import threading
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: its thread is pinnable


class Reader:
    """Reads ``block`` bytes at random aligned offsets of ``files`` with O_DIRECT until stopped."""

    def __init__(self, files: list[Path], block: int, cpu: int | None) -> None:
        self.files = [f for f in files if f.stat().st_size >= block]
        if not self.files:
            raise SystemExit(f"no file of at least {block} bytes to read")
        self.block, self.cpu = block, cpu
        self.stop = threading.Event()
        self.bytes_read, self.seconds = 0, 0.0
        self.thread: threading.Thread | None = None

    def _run(self) -> None:
        if self.cpu is not None:
            os.sched_setaffinity(0, [self.cpu])
        buffer = mmap.mmap(-1, self.block)  # page-aligned, as O_DIRECT needs
        fds = [(os.open(f, os.O_RDONLY | os.O_DIRECT), f.stat().st_size // self.block) for f in self.files]
        rng = random.Random(0)
        started = time.perf_counter()
        try:
            while not self.stop.is_set():
                fd, blocks = rng.choice(fds)
                self.bytes_read += os.preadv(fd, [buffer], rng.randrange(blocks) * self.block)
        finally:
            self.seconds += time.perf_counter() - started
            for fd, _ in fds:
                os.close(fd)

    def __enter__(self) -> Reader:
        self.stop.clear()
        self.thread = threading.Thread(target=self._run, name="io-contention-reader", daemon=True)
        self.thread.start()
        time.sleep(0.1)  # reading before the round starts
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        assert self.thread is not None
        self.thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a model stock vLLM runs (its experts all resident)")
    parser.add_argument("--read-from", required=True, type=Path,
                        help="folder whose files the reader reads (a kernel-layout store, a checkpoint)")
    parser.add_argument("--read-bytes", default=3 * 2**20, type=int, help="bytes per read (default 3 MiB)")
    parser.add_argument("--compute-cpu", default=0, type=int, help="CPU of the engine's compute thread")
    parser.add_argument("--reader-cpu", default=1, type=int, help="CPU of the reader thread")
    parser.add_argument("--prompt-tokens", default=32, type=int)
    parser.add_argument("--new-tokens", default=128, type=int)
    parser.add_argument("--rounds", default=3, type=int, help="rounds of each kind, alternated")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    os.sched_setaffinity(0, [args.compute_cpu])  # before vLLM starts: its threads start here too
    from vllm import LLM, SamplingParams

    llm = LLM(args.model, dtype="bfloat16", max_model_len=1024, kv_cache_memory_bytes=2**28, enforce_eager=True,
              seed=0, enable_prefix_caching=False)
    prompt = {"prompt_token_ids": [(7 * i) % 1000 + 10 for i in range(args.prompt_tokens)]}
    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)
    llm.generate([prompt], params, use_tqdm=False)  # warm-up
    reader = Reader(sorted(p for p in args.read_from.rglob("*") if p.is_file()), args.read_bytes, args.reader_cpu)
    times: dict[str, list[float]] = {"quiet": [], "reading": []}
    for round_ in range(args.rounds):
        for kind in ("quiet", "reading"):
            started = time.perf_counter()
            if kind == "reading":
                with reader:
                    llm.generate([prompt], params, use_tqdm=False)
            else:
                llm.generate([prompt], params, use_tqdm=False)
            ms = (time.perf_counter() - started) / args.new_tokens * 1000
            times[kind].append(ms)
            print(f"round {round_ + 1} {kind:8s} {ms:6.2f} ms/token", flush=True)
    quiet, reading = statistics.median(times["quiet"]), statistics.median(times["reading"])
    gbps = reader.bytes_read / reader.seconds / 1e9 if reader.seconds else 0.0
    print(f"median ms/token: quiet {quiet:.2f}, reading {reading:.2f} (x{reading / quiet:.3f}); "
          f"reader {gbps:.2f} GB/s in {args.read_bytes} B reads on CPU {args.reader_cpu}, "
          f"compute on CPU {args.compute_cpu}")
    if args.json:
        args.json.write_text(json.dumps({
            "model": args.model, "read_bytes": args.read_bytes, "compute_cpu": args.compute_cpu,
            "reader_cpu": args.reader_cpu, "ms_per_token": times, "ratio": reading / quiet, "reader_gbps": gbps,
        }, indent=1))


if __name__ == "__main__":
    main()
