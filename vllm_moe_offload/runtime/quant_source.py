"""The quantized tier: experts read from the expert store, dequantized, converted to the kernel layout."""

from __future__ import annotations

import torch

from vllm_moe_offload.runtime.expert_store import ExpertStore
from vllm_moe_offload.runtime.quant import dequantize_into
from vllm_moe_offload.runtime.safetensors_io import ThreadLocalReaders
from vllm_moe_offload.runtime.tiers import Converter, ExpertTensors, Into, TierKind, fill


class QuantSource:
    """One layer's experts from the quantized store (int4; int2 on request when stored).

    ``bytes_read`` counts what crossed the slow tier: the quantized bytes, rounded
    up to whole 4 KiB blocks under direct I/O, as the disk tier counts them.
    """

    tier = TierKind.QUANT

    def __init__(
        self, store: ExpertStore, layer_key: str, convert: Converter, readers: ThreadLocalReaders, dtype: torch.dtype
    ) -> None:
        self.store = store
        self.layer_key = layer_key
        self.convert = convert
        self.readers = readers
        self.dtype = dtype  # what the dequantized projections are written as (the layer's params dtype)
        self.has_low_precision = "int2" in store.precisions

    def fetch(self, expert_idx: int, low_precision: bool = False, into: Into = None) -> ExpertTensors:
        """Expert ``expert_idx`` in kernel layout; ``low_precision`` takes its int2 copy (``int4+int2`` only)."""
        precision = "int2" if low_precision else "int4"
        with self.readers.fetching(f"expert {expert_idx} of {self.layer_key} ({precision})") as reader:
            before = reader.bytes_read
            parts = self.store.read(self.layer_key, expert_idx, precision, reader)  # gate, [up,] down
            # [I, H], [I, H], [H, I] checkpoint layout, in the lane's reused scratch (the converter copies them)
            scratch = self.readers.scratch
            w = [dequantize_into(q, scratch(f"dequant{i}", q.shape, self.dtype)) for i, q in enumerate(parts)]
            w1, w3, w2 = w[0], (w[1] if len(w) == 3 else None), w[-1]
            w13, w2k = fill(into, self.convert(w1, w3, w2, into))
            return ExpertTensors(w13, w2k, reader.bytes_read - before)

    def close(self) -> None:
        pass
