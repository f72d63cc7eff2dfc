"""Micro-benchmark (not a test): an offloaded layer's kernel call by rows and distinct experts, idle and beside reads.

    python scripts/measure/kernel_beside_reads.py MODEL --policy "lru[store=kernel]" --budget 3168MiB \\
        --read-from FILE [--rows 1,2,4,8,16,32] [--experts 1,2,4,8] [--calls 6] [--json OUT]

Starts one engine in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``; the worker's OpenMP threads on
``VLLM_CPU_OMP_THREADS_BIND``, default ``0-1``), runs one short request, then times the first offloaded
layer's own kernel call (``cpu_fused_moe`` on its slot pool, as a wave of ``integration/passes.py`` calls it)
on random rows routed top-2 over the first N slots: the median of ``--calls`` calls per (rows, distinct
experts), so what a wave costs by its rows and by the experts it touches. Then the call of the largest size,
alternately idle and while a thread reads expert-sized blocks (``--read-bytes``) of ``--read-from`` back to
back with direct I/O, as the loader does when loads follow each other; with the reads' rate.

Measured on the 9 GiB model of the README's "Bigger than memory" (``docs/bench/prompt-step/``).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import statistics
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_child import add_engine_arguments, offload_settings  # noqa: E402 - this folder's
from read_under_load import _buffer, _size  # noqa: E402 - this folder's (huge-page read buffer, sizes)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


class _Reader:
    """A thread reading ``size``-byte blocks of ``path`` back to back with direct I/O until stopped."""

    def __init__(self, path: Path, size: int) -> None:
        self.path, self.size = path, size
        self.reads, self.seconds = 0, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reader", daemon=True)

    def _run(self) -> None:
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
        _raw, view = _buffer(self.size)
        blocks = max(1, os.fstat(fd).st_size // self.size)
        started = time.perf_counter()
        try:
            while not self._stop.is_set():
                os.preadv(fd, [view], (self.reads * 7919 % blocks) * self.size)
                self.reads += 1
        finally:
            self.seconds = time.perf_counter() - started
            os.close(fd)

    def __enter__(self) -> _Reader:
        self._thread.start()
        time.sleep(0.3)  # reading before the first call
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_arguments(parser)
    parser.add_argument("--read-from", type=Path, required=True,
                        help="a file of expert-sized blocks to read beside the kernel (an expert store's shard)")
    parser.add_argument("--read-bytes", default="96MiB", help="bytes per read (default 96MiB)")
    parser.add_argument("--rows", default="1,2,4,8,16,32", help="row counts (default 1,2,4,8,16,32)")
    parser.add_argument("--experts", default="1,2,4,8", help="distinct experts per call (default 1,2,4,8)")
    parser.add_argument("--calls", type=int, default=6, help="calls per size (default 6; the first is dropped)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    offload = offload_settings(parser, args)
    rows_list, experts_list = _ints(args.rows), _ints(args.experts)
    read_bytes = _size(args.read_bytes)
    if args.calls < 2 or not rows_list or not experts_list or min(rows_list + experts_list) < 1:
        parser.error("--calls must be at least 2, --rows and --experts positive")
    if read_bytes <= 0 or read_bytes % 4096:
        parser.error("--read-bytes must be a positive multiple of 4 KiB (direct I/O)")

    import torch
    from vllm import LLM, SamplingParams

    from vllm_moe_offload.integration.experts import OffloadRoutedExperts

    layers: dict[int, OffloadRoutedExperts] = {}
    kernel = OffloadRoutedExperts._kernel

    def remembered(self, x, topk_weights, slot_ids):
        layers.setdefault(self.layer_idx, self)
        return kernel(self, x, topk_weights, slot_ids)

    OffloadRoutedExperts._kernel = remembered
    llm = LLM(model=args.model, dtype="bfloat16", max_model_len=128, max_num_seqs=4, enforce_eager=True, seed=0,
              kv_cache_memory_bytes=2 ** 28, additional_config={"moe_offload": offload})
    llm.generate([{"prompt_token_ids": list(range(3, 11))}],
                 SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    layer = layers[min(layers)]
    slots = layer.slots.num_slots
    top_k = layer.top_k
    hidden = layer.w13_weight.shape[-1] if layer.w13_weight.dim() == 3 else None
    if hidden is None:
        raise SystemExit("this layer's weights are not in the plain [E, 2I, H] layout the script assumes")
    generator = torch.Generator().manual_seed(0)

    def call_ms(rows: int, experts: int) -> tuple[float, int]:
        experts = min(experts, slots)
        x = torch.randn(rows, hidden, generator=generator).to(layer.w13_weight.dtype)
        ids = torch.tensor([[(r + j) % experts for j in range(top_k)] for r in range(rows)], dtype=torch.int32)
        weights = torch.full((rows, top_k), 1.0 / top_k, dtype=torch.float32)
        times = []
        with torch.inference_mode():
            for _ in range(args.calls):
                started = time.perf_counter()
                layer._kernel(x, weights, ids)
                times.append((time.perf_counter() - started) * 1e3)
        return statistics.median(times[1:]), len(set(ids.flatten().tolist()))

    sizes = []
    print(f"{args.model}: layer {layer.layer_idx}'s kernel call, top-{top_k}, median of {args.calls - 1} calls")
    for experts in experts_list:
        for rows in rows_list:
            ms, used = call_ms(rows, experts)
            sizes.append({"rows": rows, "distinct_experts": used, "ms": ms, "ms_per_row_expert": ms / (rows * top_k)})
            print(f"  {rows:3d} rows, {used:2d} distinct experts: {ms:8.2f} ms ({ms / (rows * top_k):.2f} ms per "
                  f"row and expert)")
    rows, experts = max(rows_list), max(experts_list)
    beside = []
    print(f"\n{rows} rows, {experts} experts, idle and beside direct reads of {read_bytes / 2**20:.0f} MiB:")
    for label in ("idle", "reads beside", "idle", "reads beside"):
        if label == "idle":
            ms, _ = call_ms(rows, experts)
            beside.append({"condition": label, "ms": ms})
            print(f"  {label:13s} {ms:8.2f} ms")
            continue
        with _Reader(args.read_from, read_bytes) as reader:
            ms, _ = call_ms(rows, experts)
        rate = reader.reads * read_bytes / reader.seconds / 1e9 if reader.seconds else 0.0
        beside.append({"condition": label, "ms": ms, "reads": reader.reads, "read_gbps": rate})
        print(f"  {label:13s} {ms:8.2f} ms ({reader.reads} reads, {rate:.2f} GB/s)")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "offload": offload, "top_k": top_k, "sizes": sizes,
                                         "beside_reads": beside}, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
