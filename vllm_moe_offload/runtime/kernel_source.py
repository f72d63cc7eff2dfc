"""The kernel-store tier: experts read from a store already in the layer's kernel layout."""

from __future__ import annotations

from vllm_moe_offload.runtime.expert_store import ExpertStore
from vllm_moe_offload.runtime.safetensors_io import ThreadLocalReaders
from vllm_moe_offload.runtime.tiers import ExpertTensors, Into, TierKind


class KernelSource:
    """One layer's experts from a ``kernel`` expert store: one direct read straight into the slot.

    No conversion runs on a load: the store holds what the layer's converter
    returned when the store was built. Host slot pools are aligned for direct
    I/O (``slots.slot_pool``), so the read lands in the slot itself: no staging
    buffer and no copy, and the fetch holds no conversion memory
    (``ExpertStore.read_kernel``). ``bytes_read`` counts whole 4 KiB blocks
    under direct I/O, as the disk tier counts them.
    """

    tier = TierKind.KERNEL

    def __init__(self, store: ExpertStore, layer_key: str, readers: ThreadLocalReaders) -> None:
        self.store = store
        self.layer_key = layer_key
        self.readers = readers

    def fetch(self, expert_idx: int, into: Into = None) -> ExpertTensors:
        what = f"expert {expert_idx} of {self.layer_key} (kernel layout)"
        with self.readers.fetching(what, convert=False) as reader:
            before = reader.bytes_read
            # w13 [2I', H'], w2 [H', I'] (and a quantized layer's scales): ``into`` itself, or fresh tensors
            w13, w2, *extra = self.store.read_kernel(self.layer_key, expert_idx, reader, into)
            return ExpertTensors(w13, w2, reader.bytes_read - before, tuple(extra))

    def close(self) -> None:
        pass
