"""Per-expert fetch cost, full precision (DiskSource) vs int4 / int2 (QuantSource), direct I/O.

Usage: python scripts/measure/quant_fetch.py MODEL_DIR STORE_ROOT  (identity-layout converter: w13 = cat(w1, w3))
"""
import sys
import time

import torch

from vllm_moe_offload.runtime.expert_store import LayerSpec, open_or_build, store_directory
from vllm_moe_offload.runtime.quant_source import QuantSource
from vllm_moe_offload.runtime.safetensors_io import CheckpointIndex, ThreadLocalReaders
from vllm_moe_offload.runtime.expert_layout import per_expert_layout
from vllm_moe_offload.runtime.tiers import DiskSource

torch.set_num_threads(1)
model, root = sys.argv[1], sys.argv[2]
index = CheckpointIndex(model)
names = [per_expert_layout(f"model.layers.{i}.block_sparse_moe.experts", "w1", "w3", "w2") for i in range(2)]
readers = ThreadLocalReaders(direct_io=True)
t0 = time.perf_counter()
store = open_or_build(index, [LayerSpec(n, 16) for n in names], "int4+int2",
                      store_directory(root, model, "int4+int2"), readers)
print(f"store open/build {time.perf_counter() - t0:.1f} s")


def cat(w1, w3, w2):
    return torch.cat([w1, w3]), w2


disk = DiskSource(index, names[1], cat, readers)
quant = QuantSource(store, names[1].prefix, cat, readers, torch.bfloat16)
for label, fetch in (("none", disk.fetch), ("int4", quant.fetch), ("int2", lambda e: quant.fetch(e, low_precision=True))):
    fetch(0)
    started, nbytes = time.perf_counter(), 0
    for e in range(16):
        nbytes += fetch(e).bytes_read
    took = (time.perf_counter() - started) / 16
    print(f"{label}: {nbytes / 16 / 2**20:.3f} MiB read per expert, {took * 1e3:.1f} ms per fetch "
          f"(read + dequantize + cat)")
parts = store.read(names[1].prefix, 3, "int4", readers.get())
from vllm_moe_offload.runtime.quant import dequantize
started = time.perf_counter()
for _ in range(5):
    for q in parts:
        dequantize(q, torch.bfloat16)
print(f"int4 dequantize only: {(time.perf_counter() - started) / 5 * 1e3:.1f} ms per expert")
