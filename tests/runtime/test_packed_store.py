"""The packed expert store on a real safetensors checkpoint: the kernel store's bytes, fewer of them, decoded
into the slot; torn blocks fail their load; layouts the coding cannot take are refused with the reason."""

from __future__ import annotations

import json
import re

import pytest
import torch

from tests.runtime.conftest import E, H, I, LAYERS
from tests.runtime.conftest import expert_names as _names
from tests.runtime.test_kernel_store import Transposing, _layout, flip_bits
from vllm_moe_offload.core.config import OffloadConfigError
from vllm_moe_offload.runtime.crc import crc32
from vllm_moe_offload.runtime.expert_store import (
    KERNEL,
    MANIFEST,
    PACKED,
    ExpertStoreError,
    KernelLayout,
    LayerSpec,
    open_or_build,
    store_directory,
)
from vllm_moe_offload.core.plan import buffer_bytes
from vllm_moe_offload.runtime import packed_codec
from vllm_moe_offload.runtime.kernel_source import KernelSource
from vllm_moe_offload.runtime.safetensors_io import ALIGN_BYTES, CheckpointIndex


def _open(folder, root, readers, layout, scheme=PACKED):
    layers = [LayerSpec(_names(i), E) for i in range(LAYERS)]
    return open_or_build(CheckpointIndex(folder), layers, scheme, store_directory(root, folder, scheme), readers,
                         layout)


def test_loads_give_the_kernel_stores_tensors_from_fewer_bytes(checkpoint, tmp_path, readers):
    folder, tensors = checkpoint
    converters = [Transposing(i) for i in range(LAYERS)]
    packed = _open(folder, tmp_path / "s", readers, _layout(converters))
    kernel = _open(folder, tmp_path / "s", readers, _layout([Transposing(i) for i in range(LAYERS)]), KERNEL)
    assert packed.directory != kernel.directory
    assert [c.calls for c in converters] == [E] * LAYERS  # the build converted every expert once
    manifest = json.loads((packed.directory / MANIFEST).read_text())
    assert manifest["scheme"] == PACKED and manifest["precisions"][PACKED]["coding"].startswith("high byte in 4 bits")
    assert manifest["total_bytes"] < 0.85 * kernel.total_bytes
    slots13 = torch.zeros(3, H, 2 * I, dtype=torch.bfloat16)  # [slots, H, 2I]
    slots2 = torch.zeros(3, I, H, dtype=torch.bfloat16)
    max_block = _layout(converters).packed_block_bytes
    for layer_idx in range(LAYERS):
        prefix = _names(layer_idx).prefix
        source = KernelSource(packed, prefix, readers)
        for e in range(E):
            w1, w3, w2 = (tensors[n] for n in _names(layer_idx).tensor_names(e))
            want13, want2 = Transposing(layer_idx)(w1, w3, w2)
            got = source.fetch(e, into=(slots13[1], slots2[1]))
            assert got.w13.data_ptr() == slots13[1].data_ptr() and got.w2.data_ptr() == slots2[1].data_ptr()
            assert torch.equal(slots13[1], want13) and torch.equal(slots2[1], want2)
            block = packed.block(prefix, e, PACKED)
            assert block.offset % ALIGN_BYTES == 0 and block.length <= max_block
            # whole 4 KiB blocks of the packed block: fewer than the kernel store's for the same expert
            assert got.bytes_read == -(-block.length // ALIGN_BYTES) * ALIGN_BYTES
            assert got.bytes_read < KernelSource(kernel, prefix, readers).fetch(e).bytes_read
            fresh = source.fetch(e)  # no slot: tensors of its own
            assert torch.equal(fresh.w13, want13) and torch.equal(fresh.w2, want2)
    assert [c.calls for c in converters] == [E] * LAYERS  # loads only read and decode
    assert not slots13[0].any() and not slots13[2].any()  # other slots untouched


def test_blocks_of_several_pieces_decode_piece_by_piece_through_one_buffer(checkpoint, tmp_path, readers,
                                                                         monkeypatch):
    """Pieces of 8 KiB (the test's experts then span several, as a model's experts of more than 8 MiB do):
    the read buffer holds a piece, not a block; the values are the kernel store's; a bit flipped in the last
    piece fails the expert's first load."""
    folder, tensors = checkpoint
    monkeypatch.setattr(packed_codec, "PAGE", 2 * ALIGN_BYTES)
    monkeypatch.setattr(packed_codec, "MAX_PIECE_BYTES", 2 * ALIGN_BYTES)
    layout = _layout([Transposing(i) for i in range(LAYERS)])
    store = _open(folder, tmp_path / "s", readers, layout)
    piece = layout.packed_piece_bytes
    prefix = _names(0).prefix
    source = KernelSource(store, prefix, readers)
    for e in range(E):
        block = store.block(prefix, e, PACKED)
        assert block.length > piece  # two pieces or more
        w1, w3, w2 = (tensors[n] for n in _names(0).tensor_names(e))
        want13, want2 = Transposing(0)(w1, w3, w2)
        got = source.fetch(e)
        assert torch.equal(got.w13, want13) and torch.equal(got.w2, want2)
        assert got.bytes_read == -(-block.length // ALIGN_BYTES) * ALIGN_BYTES
    assert piece == 2 * ALIGN_BYTES and readers.buffers.held_bytes == buffer_bytes(piece)
    fresh = _open(folder, tmp_path / "s", readers, layout)  # a new process's store: first reads are checked
    flip_bits(fresh, prefix, 1, at=store.block(prefix, 1, PACKED).length - 100, mask=0x10)
    with pytest.raises(ExpertStoreError, match=rf"expert 1 of {prefix} \(packed\) in .* is corrupted"):
        KernelSource(fresh, prefix, readers).fetch(1)
    KernelSource(fresh, prefix, readers).fetch(2)  # the others still load


def test_a_large_expert_is_read_in_pieces_of_at_most_8_mib():
    """A 96 MiB expert (the bigger-than-memory bench model's): pieces of 8 MiB, so its load stages 8 MiB
    where a whole block would take an expert's bytes from the slots' share of the budget; a small expert
    is read whole."""
    layout = KernelLayout({}, ((2 * 131072, 128), torch.bfloat16), ((128, 131072), torch.bfloat16))
    assert layout.expert_bytes == 96 * 2**20 <= layout.packed_block_bytes < 100 * 2**20
    assert layout.packed_piece_bytes == 8 * 2**20
    small = _layout([Transposing(i) for i in range(LAYERS)])
    assert small.packed_piece_bytes == -(-small.packed_block_bytes // packed_codec.PAGE) * packed_codec.PAGE


def test_a_torn_block_fails_its_load(checkpoint, tmp_path, readers):
    folder, _ = checkpoint
    store = _open(folder, tmp_path / "s", readers, _layout([Transposing(i) for i in range(LAYERS)]))
    prefix = _names(0).prefix
    source = KernelSource(store, prefix, readers)
    flip_bits(store, prefix, 3, at=100, mask=0x10)
    with pytest.raises(ExpertStoreError, match=rf"expert 3 of {prefix} \(packed\) in .* is corrupted"):
        source.fetch(3)
    source.fetch(2)  # the others still load


def test_a_block_whose_checksum_matches_but_does_not_decode_fails_its_load(checkpoint, tmp_path, readers):
    """Bytes the crc32 cannot tell apart from good ones (here: written with a matching manifest) still never
    become wrong weights: the decoder checks every length and escape."""
    folder, _ = checkpoint
    root = tmp_path / "s"
    layout = _layout([Transposing(i) for i in range(LAYERS)])
    store = _open(folder, root, readers, layout)
    prefix = _names(1).prefix
    block = store.block(prefix, 0, PACKED)
    with open(store.layer_file(prefix), "r+b") as f:
        f.seek(block.offset + 16)  # the first chunk's value count
        f.write((H * 2 * I + 1).to_bytes(8, "little"))
        f.seek(block.offset)
        raw = f.read(block.length)
    manifest = json.loads((store.directory / MANIFEST).read_text())
    manifest["layers"][prefix]["experts"][PACKED][0][2] = crc32(raw)
    (store.directory / MANIFEST).write_text(json.dumps(manifest))
    reopened = _open(folder, root, readers, _layout([Transposing(i) for i in range(LAYERS)]))
    with pytest.raises(ExpertStoreError, match=rf"expert 0 of {prefix} \(packed\).* does not decode \(a chunk is "
                                               rf"out of order or runs past its tensor: the block is torn\); delete"):
        KernelSource(reopened, prefix, readers).fetch(0)


def test_a_block_longer_than_any_coding_makes_the_store_stale(checkpoint, tmp_path, readers, caplog):
    folder, _ = checkpoint
    root = tmp_path / "s"
    store = _open(folder, root, readers, _layout([Transposing(i) for i in range(LAYERS)]))
    manifest = json.loads((store.directory / MANIFEST).read_text())
    manifest["layers"][_names(0).prefix]["experts"][PACKED][1][1] = 10**6
    (store.directory / MANIFEST).write_text(json.dumps(manifest))
    again = [Transposing(i) for i in range(LAYERS)]
    _open(folder, root, readers, _layout(again))
    assert "a packed block is 1 to" in caplog.text and sum(c.calls for c in again) == LAYERS * E  # rebuilt


@pytest.mark.parametrize("layout, reason", [
    (KernelLayout({}, ((H, 2 * I), torch.float32), ((I, H), torch.float32)), "its w13 is torch.float32"),
    (KernelLayout({}, ((H, 2 * I), torch.int8), ((I, H), torch.int8), (), (((8,), torch.float32),)),
     "its kernel tensors include 1 per-expert scales"),
])
def test_layouts_the_coding_cannot_take_are_refused(checkpoint, tmp_path, readers, layout, reason):
    folder, _ = checkpoint
    want = f"store 'packed' cannot code these experts: {re.escape(reason)}.*use store 'kernel'"
    with pytest.raises(OffloadConfigError, match=want):
        _open(folder, tmp_path / "s", readers, layout)
    assert not store_directory(tmp_path / "s", folder, PACKED).exists()
