"""The kernel-layout expert store on a real safetensors checkpoint: what it holds, that loads
only read it (no conversion), reuse, staleness when the layout's identity changes, and torn bytes."""

from __future__ import annotations

import json
import os
import logging

import pytest
import torch

from vllm_moe_offload.runtime import checked_read, expert_store
from vllm_moe_offload.runtime.crc import crc32
from vllm_moe_offload.runtime.expert_store import (
    KERNEL,
    MANIFEST,
    ExpertStoreError,
    KernelLayout,
    LayerSpec,
    open_or_build,
    store_directory,
)
from vllm_moe_offload.runtime.kernel_source import KernelSource
from vllm_moe_offload.runtime.safetensors_io import ALIGN_BYTES, CheckpointIndex
from vllm_moe_offload.runtime.tiers import TierKind
from tests.runtime.conftest import E, H, I, LAYERS
from tests.runtime.conftest import expert_names as _names


class Transposing:
    """A converter whose layout differs from the checkpoint's: [H, 2I] and [I, H], scaled by the layer."""

    def __init__(self, layer_idx: int) -> None:
        self.scale = float(layer_idx + 1)
        self.calls = 0

    def __call__(self, w1, w3, w2, into=None):
        self.calls += 1
        return (torch.cat([w1, w3]) * self.scale).t().contiguous(), (w2 * self.scale).t().contiguous()


def _layout(converters, isa="vec") -> KernelLayout:
    identity = {"vllm": "test", "isa": isa, "tp_rank": 0, "tp_size": 1}
    return KernelLayout(identity, ((H, 2 * I), torch.bfloat16), ((I, H), torch.bfloat16), converters)


def _open(folder, root, readers, layout):
    layers = [LayerSpec(_names(i), E) for i in range(LAYERS)]
    return open_or_build(CheckpointIndex(folder), layers, KERNEL, store_directory(root, folder, KERNEL), readers, layout)


def test_store_holds_the_converter_output_and_loads_never_convert(checkpoint, tmp_path, readers):
    folder, tensors = checkpoint
    converters = [Transposing(i) for i in range(LAYERS)]
    store = _open(folder, tmp_path / "stores", readers, _layout(converters))
    assert [c.calls for c in converters] == [E] * LAYERS  # the build converted every expert once
    manifest = json.loads((store.directory / MANIFEST).read_text())
    assert manifest["scheme"] == KERNEL
    assert manifest["precisions"][KERNEL]["w13"] == {"shape": [H, 2 * I], "dtype": "torch.bfloat16"}
    assert manifest["precisions"][KERNEL]["w2_offset"] % ALIGN_BYTES == 0
    slots13 = torch.zeros(3, H, 2 * I, dtype=torch.bfloat16)  # [slots, H, 2I]
    slots2 = torch.zeros(3, I, H, dtype=torch.bfloat16)
    for layer_idx, convert in enumerate(converters):
        source = KernelSource(store, _names(layer_idx).prefix, readers)
        assert source.tier is TierKind.KERNEL
        for e in range(E):
            w1, w3, w2 = (tensors[n] for n in _names(layer_idx).tensor_names(e))
            want13, want2 = Transposing(layer_idx)(w1, w3, w2)
            got = source.fetch(e, into=(slots13[1], slots2[1]))
            assert got.w13.data_ptr() == slots13[1].data_ptr() and got.w2.data_ptr() == slots2[1].data_ptr()
            assert torch.equal(slots13[1], want13) and torch.equal(slots2[1], want2)
            assert got.bytes_read == store.block(_names(layer_idx).prefix, e, KERNEL).length  # whole blocks
            fresh = source.fetch(e)  # no slot: tensors of its own, not views of the reader's buffer
            assert torch.equal(fresh.w13, want13) and torch.equal(fresh.w2, want2)
            assert fresh.w13.untyped_storage().data_ptr() != got.w13.untyped_storage().data_ptr()
    assert [c.calls for c in converters] == [E] * LAYERS  # loads only read
    assert torch.equal(slots13[0], torch.zeros(H, 2 * I, dtype=torch.bfloat16))  # other slots untouched


def test_second_open_reuses_and_a_new_identity_rebuilds(checkpoint, tmp_path, readers, caplog):
    folder, _ = checkpoint
    _open(folder, tmp_path / "s", readers, _layout([Transposing(i) for i in range(LAYERS)]))
    again = [Transposing(i) for i in range(LAYERS)]
    with caplog.at_level(logging.INFO, logger="vllm.moe_offload.expert_store"):
        _open(folder, tmp_path / "s", readers, _layout(again))
    assert "using the kernel expert store" in caplog.text and sum(c.calls for c in again) == 0
    caplog.clear()
    other_isa = [Transposing(i) for i in range(LAYERS)]
    with caplog.at_level(logging.INFO, logger="vllm.moe_offload.expert_store"):
        store = _open(folder, tmp_path / "s", readers, _layout(other_isa, isa="amx"))
    assert "is stale (precisions" in caplog.text and "'isa': 'amx'" in caplog.text
    assert sum(c.calls for c in other_isa) == LAYERS * E
    assert json.loads((store.directory / MANIFEST).read_text())["precisions"][KERNEL]["isa"] == "amx"


def flip_bits(store, prefix: str, expert_idx: int, at: int, mask: int) -> None:
    """XOR byte ``at`` of the expert's block in the store's file with ``mask`` (a torn write)."""
    block = store.block(prefix, expert_idx, store.scheme)
    with open(store.layer_file(prefix), "r+b") as f:
        f.seek(block.offset + at)
        byte = f.read(1)
        f.seek(block.offset + at)
        f.write(bytes([byte[0] ^ mask]))


def test_torn_bytes_are_refused_and_a_good_expert_is_checked_once(checkpoint, tmp_path, readers, monkeypatch):
    folder, _ = checkpoint
    store = _open(folder, tmp_path / "s", readers, _layout([Transposing(i) for i in range(LAYERS)]))
    prefix = _names(1).prefix
    source = KernelSource(store, prefix, readers)
    flip_bits(store, prefix, 2, at=7, mask=0x01)
    checks = []
    counted = lambda data, *crc: checks.append(1) or crc32(data, *crc)  # noqa: E731
    monkeypatch.setattr(expert_store, "crc32", counted)  # a read through a staging copy
    monkeypatch.setattr(checked_read, "crc32", counted)  # a read into the slot (read_into)
    with pytest.raises(ExpertStoreError, match=rf"expert 2 of {prefix} \(kernel\) in .*layer_001.bin is corrupted"):
        source.fetch(2)
    with pytest.raises(ExpertStoreError, match="is corrupted"):  # a torn expert is never marked good
        source.fetch(2)
    checks.clear()
    source.fetch(1)
    assert checks  # the first read of expert 1 checked its crc32 (one call per segment of the read)
    checks.clear()
    for _ in range(2):
        source.fetch(1)
    assert not checks  # later reads only their length


def test_a_converter_that_disagrees_with_the_slots_fails_the_build(checkpoint, tmp_path, readers):
    folder, _ = checkpoint
    layout = KernelLayout({"vllm": "test"}, ((2 * I, H), torch.bfloat16), ((H, I), torch.bfloat16),
                          [Transposing(i) for i in range(LAYERS)])
    with pytest.raises(ExpertStoreError, match=r"the converter gave w13 torch.bfloat16 \[96, 128\], the layer's "
                                               r"slots hold torch.bfloat16 \[128, 96\]"):
        _open(folder, tmp_path / "s", readers, layout)
    assert not store_directory(tmp_path / "s", folder, KERNEL).exists()


def test_the_build_keeps_little_of_the_store_in_the_page_cache(checkpoint, tmp_path, readers, monkeypatch):
    """A store is as large as the experts: written through the page cache whole, it would fill a memory cgroup
    (which counts the cache). The build writes back and drops what it wrote every DROP_WRITTEN_BYTES."""
    from vllm_moe_offload.cli.bench_run import resident_pages

    folder, _ = checkpoint
    block = 9 * ALIGN_BYTES  # one expert: w13 [96, 128] and w2 [64, 96] in bf16, whole blocks
    monkeypatch.setattr(expert_store, "DROP_WRITTEN_BYTES", 2 * block)
    root = tmp_path / "stores"
    seen = []

    class Measuring(Transposing):
        def __call__(self, w1, w3, w2, into=None):  # runs before each expert is written
            files = [p for p in root.rglob("*.bin") if p.stat().st_size]  # (an empty file maps nothing)
            seen.append(sum(int(resident_pages(str(p)).sum()) for p in files) * os.sysconf("SC_PAGE_SIZE"))
            return super().__call__(w1, w3, w2, into)

    store = _open(folder, root, readers, _layout([Measuring(i) for i in range(LAYERS)]))
    assert store.block(_names(0).prefix, 1, KERNEL).offset == block  # the geometry the limit above assumes
    assert len(seen) == E * LAYERS and max(seen) > 0  # written pages are in the cache until dropped
    # at most one expert written since the last drop (without the drops: up to 4 of a layer's 5)
    assert max(seen) <= block, seen
    assert all(not resident_pages(str(p)).any() for p in root.rglob("*.bin"))  # nothing left after the build
