"""The packed store's lossless coding: every 16-bit pattern comes back, on every path (AVX2, the plain C loop,
NumPy), whole or page by page, trained weights shrink to about 0.75, no chunk crosses a page, and a torn block
is an error, never wrong values."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from vllm_moe_offload.runtime import packed_codec
from vllm_moe_offload.runtime.packed_codec import (
    PAGE, BlockDecoder, PackedCodingError, chunk_bytes, decode_block, encode_block, max_block_bytes,
)

TRAINED = Path(__file__).resolve().parents[3] / "shared" / "models" / "tiny-mixtral" / "model.safetensors"
HEADER = struct.Struct("<4sIQQQII16s")


def _block(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.frombuffer(encode_block(tensors), dtype=torch.uint8)  # [bytes]


def _decoded(block: torch.Tensor, like: list[torch.Tensor], simd: bool = True, pages: int | None = None):
    """``block`` decoded into tensors shaped as ``like``, in pieces of ``pages`` pages (None: at once)."""
    out = [torch.full_like(t, 7) for t in like]
    if pages is None:
        decode_block(block, out, simd=simd)
        return out
    decoder = BlockDecoder(out, simd=simd)
    for at in range(0, block.numel(), pages * PAGE):
        decoder.feed(block[at : at + pages * PAGE])
    decoder.finish()
    return out


def _all_paths(block: torch.Tensor, like: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """The values decoded by the compiled coder with and without SIMD, page by page, and by the NumPy one."""
    out = [_decoded(block, like, simd) for simd in (True, False)]
    out.append(_decoded(block, like, pages=1))
    saved = packed_codec._loaded
    packed_codec._loaded = packed_codec._NumPy()
    try:
        out.append(_decoded(block, like, pages=1))
    finally:
        packed_codec._loaded = saved
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16)


def _same(got: list[torch.Tensor], want: list[torch.Tensor]) -> bool:
    return all(torch.equal(_bits(g), _bits(w)) for g, w in zip(got, want, strict=True))


def _chunks(block: torch.Tensor) -> list[tuple[int, list]]:
    """(where in the block, header fields) of every chunk, walking the pages as the decoder does."""
    out = []
    for page_at in range(0, block.numel(), PAGE):
        at, end = page_at, min(page_at + PAGE, block.numel())
        while at + 64 <= end:
            fields = list(HEADER.unpack(bytes(block[at : at + HEADER.size].numpy())))
            if fields[0] == bytes(4):
                break
            out.append((at, fields))
            at += chunk_bytes(fields[3], fields[4], bool(fields[5]))
    return out


def _with_header(block: torch.Tensor, at: int, fields: list) -> torch.Tensor:
    out = block.clone()
    out[at : at + HEADER.size] = torch.frombuffer(bytearray(HEADER.pack(*fields)), dtype=torch.uint8)
    return out


@pytest.mark.skipif(not TRAINED.exists(), reason=f"no trained model at {TRAINED}")
def test_trained_weights_shrink_to_three_quarters_and_come_back():
    with safe_open(str(TRAINED), "pt") as f:
        names = [n for n in f.keys() if "experts" in n][:6]
        weights = [f.get_tensor(n) for n in names]
    assert all(w.dtype == torch.bfloat16 for w in weights)
    tiled = [torch.cat([w] * 24) for w in weights[:2]]  # 1.5 MiB each: a block of several pages
    for tensors in (weights, tiled):
        block = _block(tensors)
        raw = sum(2 * t.numel() for t in tensors)
        assert 0.74 < block.numel() / raw < 0.77, (block.numel(), raw)
        for got in _all_paths(block, tensors):
            assert _same(got, tensors)
    assert block.numel() > 4 * PAGE
    assert _same(_decoded(block, tiled, pages=3), tiled)  # pieces of several pages, the last one short


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=1, max_value=200_000), min_size=1, max_size=3),
    spread=st.sampled_from([1, 4, 15, 16, 40, 256]),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
)
def test_any_values_come_back_and_never_take_more_than_the_bound(sizes, spread, seed):
    """``spread`` distinct high bytes: up to 15 all coded, beyond it escapes, at 256 mostly raw tensors."""
    rng = np.random.default_rng(seed)
    tensors = []
    for n in sizes:
        high = rng.choice(rng.permutation(256)[:spread], size=n).astype(np.uint16)
        raw = (high << 8) | rng.integers(0, 256, n).astype(np.uint16)
        tensors.append(torch.from_numpy(raw.view(np.int16).copy()).view(torch.bfloat16))
    block = _block(tensors)
    assert block.numel() <= max_block_bytes(sizes)
    for at, fields in _chunks(block):  # no chunk crosses a page
        assert at // PAGE == (at + chunk_bytes(fields[3], fields[4], bool(fields[5])) - 1) // PAGE
    for got in _all_paths(block, tensors):
        assert _same(got, tensors)
    halves = [t.view(torch.float16) for t in tensors]
    assert _same(_decoded(_block(halves), halves), halves)


def test_escapes_at_simd_edges_and_chunk_ends_across_pages():
    """Escapes at the edges of the 64-value blocks the AVX2 loop decodes, in the plain tail after them, and
    at the first and last value of chunks, in a tensor of several pages."""
    rng = np.random.default_rng(0)
    n = 3 * PAGE // 2 * 2 + 37  # about three pages of coded values
    high = rng.integers(0x30, 0x30 + 15, n).astype(np.uint16)  # 15 high bytes: the table holds them all
    raw = (high << 8) | rng.integers(0, 256, n).astype(np.uint16)
    first = _chunks(_block([torch.from_numpy(raw.view(np.int16).copy()).view(torch.bfloat16)]))
    ends = [f[2] for _, f in first[1:]]  # where the second and later chunks start without escapes
    planted = sorted({0, 63, 64, 127, n - 1, n - 38, *ends, *(e - 1 for e in ends)})
    raw[planted] = 0x7F00 | (np.arange(len(planted), dtype=np.uint16) % 256)  # outside the table: escapes
    values = torch.from_numpy(raw.view(np.int16).copy()).view(torch.bfloat16)
    block = _block([values])
    chunks = _chunks(block)
    assert len(chunks) >= 3 and all(f[5] == 1 for _, f in chunks)
    assert sum(f[4] for _, f in chunks) == len(planted)
    for got in _all_paths(block, [values]):
        assert _same(got, [values])


def test_blocks_of_8_mib_or_more_decode_with_streaming_stores_to_the_same_values():
    """Past the caches (streaming stores) where the output is 32-byte aligned, plain stores where it is not:
    the same values either way."""
    rng = np.random.default_rng(2)
    n = packed_codec.STREAMING_STORE_BYTES // 2 + 4099
    raw = (rng.integers(0x30, 0x30 + 15, n).astype(np.uint16) << 8) | rng.integers(0, 256, n).astype(np.uint16)
    raw[rng.choice(n, 100, replace=False)] = 0x7F00  # escapes
    values = torch.from_numpy(raw.view(np.int16).copy()).view(torch.bfloat16)
    block = _block([values])
    assert all(fields[5] == 1 for _, fields in _chunks(block))  # coded
    aligned = torch.empty(n + 16, dtype=torch.bfloat16)
    skew = (-aligned.data_ptr() % 32) // 2
    for at in (skew, skew + 1):  # 32-byte aligned, then 2 bytes off
        out = aligned[at : at + n]
        decoder = BlockDecoder([out])
        assert decoder.stream
        decoder.feed(block)
        decoder.finish()
        assert torch.equal(_bits(out), _bits(values))
    assert not BlockDecoder([values[:1000]]).stream


def test_torn_blocks_are_errors():
    rng = np.random.default_rng(1)
    n = PAGE  # two pages of coded values, then a second tensor
    raw = (rng.integers(0x30, 0x30 + 15, n).astype(np.uint16) << 8) | rng.integers(0, 256, n).astype(np.uint16)
    raw[10] = 0x7F01  # one escape, in the first chunk
    values = [torch.from_numpy(raw.view(np.int16).copy()).view(torch.bfloat16), torch.ones(5000, dtype=torch.bfloat16)]
    block = _block(values)
    chunks = _chunks(block)
    (at0, first), (at1, second) = chunks[0], chunks[1]
    assert first[4] == 1 and first[5] == 1 and second[2] == first[3]  # one escape, coded; the next chunk follows
    out = [torch.empty_like(v) for v in values]
    with pytest.raises(PackedCodingError, match="not one of coding version 2"):
        decode_block(_with_header(block, at0, [b"XXXX", *first[1:]]), out)
    with pytest.raises(PackedCodingError, match="not one of coding version 2"):
        decode_block(_with_header(block, at0, [*first[:6], 1, first[7]]), out)
    with pytest.raises(PackedCodingError, match="out of order"):
        decode_block(_with_header(block, at1, [*second[:2], second[2] + 64, *second[3:]]), out)  # a gap
    with pytest.raises(PackedCodingError, match="out of order"):
        decode_block(_with_header(block, at0, [first[0], 1, *first[2:]]), out)  # the second tensor first
    with pytest.raises(PackedCodingError, match="out of order"):
        decode_block(block, [out[0][:-1], out[1]])  # the tensor is shorter than its chunks
    with pytest.raises(PackedCodingError, match="past its page"):
        decode_block(_with_header(block, at0, [*first[:3], first[3], 10**5, *first[5:]]), out)  # escapes
    with pytest.raises(PackedCodingError, match="values are missing"):
        decode_block(block[:at1], out)  # a block cut short
    with pytest.raises(PackedCodingError, match="values are missing"):
        decode_block(block, [*out, torch.empty(3, dtype=torch.bfloat16)])
    # the escape's position moved onto a value coded from the table: torn, on every path
    esc_at = at0 + 64 + first[3] // 2
    esc_at += -esc_at % 64
    esc_at += first[3]
    esc_at += -esc_at % 64
    assert bytes(block[esc_at : esc_at + 4].numpy()) == struct.pack("<I", 10)
    torn = block.clone()
    for where in (11, first[3]):  # a value without an escape code, and past the chunk
        torn[esc_at : esc_at + 4] = torch.frombuffer(bytearray(struct.pack("<I", where)), dtype=torch.uint8)
        for simd in (True, False):
            with pytest.raises(PackedCodingError, match="torn"):
                decode_block(torn, out, simd=simd)
        saved = packed_codec._loaded
        packed_codec._loaded = packed_codec._NumPy()
        try:
            with pytest.raises(PackedCodingError, match="torn"):
                decode_block(torn, out)
        finally:
            packed_codec._loaded = saved
    with pytest.raises(ValueError, match="takes"):
        encode_block([torch.zeros(4, dtype=torch.float32)])


def test_without_a_compiler_numpy_decodes_the_same(tmp_path):
    """No working C compiler (CC names one that fails): a warning, then the NumPy coder, the same values."""
    script = (
        "import torch\n"
        "from vllm_moe_offload.runtime import packed_codec as pc\n"
        "v = (torch.randn(3001) * 0.02).to(torch.bfloat16)\n"
        "s = torch.frombuffer(pc.encode_block([v]), dtype=torch.uint8)\n"
        "o = torch.empty_like(v); pc.decode_block(s, [o])\n"
        "assert torch.equal(o.view(torch.int16), v.view(torch.int16))\n"
        "print(pc.implementation())\n"
    )
    env = {**os.environ, "CC": "false", "VLLM_CACHE_ROOT": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "NumPy"
    assert "could not be built" in done.stderr and "decoding with NumPy" in done.stderr
    assert not list((tmp_path / "cache").rglob("*.so"))  # no half-written library left behind


def test_the_compiled_coder_is_cached_per_source(tmp_path):
    env = {**os.environ, "VLLM_CACHE_ROOT": str(tmp_path / "cache")}
    script = "from vllm_moe_offload.runtime import packed_codec as pc; print(pc.implementation())"
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip().startswith("C")
    (library,) = (tmp_path / "cache" / "moe_offload" / "codec").iterdir()
    assert library.name.startswith("packed_codec-") and library.suffix == ".so"
