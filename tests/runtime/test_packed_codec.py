"""The packed store's lossless coding: every 16-bit pattern comes back, on every path (AVX2, the plain C loop,
NumPy), trained weights shrink to about 0.75, and a torn segment is an error, never wrong values."""

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
from vllm_moe_offload.runtime.packed_codec import PackedCodingError, decode_into, encode, segment_bytes

TRAINED = Path(__file__).resolve().parents[3] / "shared" / "models" / "tiny-mixtral" / "model.safetensors"


def _segment(values: torch.Tensor) -> torch.Tensor:
    return torch.frombuffer(bytearray(encode(values)), dtype=torch.uint8)  # [bytes]


def _all_paths(segment: torch.Tensor, like: torch.Tensor) -> list[torch.Tensor]:
    """The values decoded by the compiled coder with and without SIMD, and by the NumPy one."""
    out = []
    for simd in (True, False):
        got = torch.full_like(like, 7)
        assert decode_into(segment, got, simd=simd) == segment.numel()
        out.append(got)
    saved = packed_codec._loaded
    packed_codec._loaded = packed_codec._NumPy()
    try:
        got = torch.full_like(like, 7)
        decode_into(segment, got)
        out.append(got)
    finally:
        packed_codec._loaded = saved
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16)


@pytest.mark.skipif(not TRAINED.exists(), reason=f"no trained model at {TRAINED}")
def test_trained_weights_shrink_to_three_quarters_and_come_back():
    with safe_open(str(TRAINED), "pt") as f:
        names = [n for n in f.keys() if "experts" in n][:6]
        weights = [f.get_tensor(n) for n in names]
    assert all(w.dtype == torch.bfloat16 for w in weights)
    for w in weights:
        segment = _segment(w)
        assert 0.74 < segment.numel() / (2 * w.numel()) < 0.77, (segment.numel(), w.numel())
        for got in _all_paths(segment, w):
            assert torch.equal(_bits(got), _bits(w))


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(min_value=1, max_value=700),
    spread=st.sampled_from([1, 4, 15, 16, 40, 256]),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
)
def test_any_values_come_back_and_never_take_more_than_raw(n, spread, seed):
    """``spread`` distinct high bytes: up to 15 all coded, beyond it escapes, at 256 mostly raw segments."""
    rng = np.random.default_rng(seed)
    high = rng.choice(rng.permutation(256)[:spread], size=n).astype(np.uint16)
    values = torch.from_numpy(((high << 8) | rng.integers(0, 256, n).astype(np.uint16)).view(np.int16).copy())
    values = values.view(torch.bfloat16)
    segment = _segment(values)
    assert segment.numel() <= segment_bytes(n, 0, coded=False)
    for got in _all_paths(segment, values):
        assert torch.equal(_bits(got), _bits(values))
    assert torch.equal(_bits(_all_paths(_segment(values.view(torch.float16)), values.view(torch.float16))[0]),
                       _bits(values))


def test_a_long_tensor_with_escapes_on_the_simd_path():
    """Escapes at the edges of the 64-value blocks the AVX2 loop decodes, and in the plain tail after them."""
    rng = np.random.default_rng(0)
    n = 64 * 50 + 37
    high = rng.integers(0x30, 0x30 + 15, n).astype(np.uint16)  # 15 high bytes: the table holds them all
    raw = (high << 8) | rng.integers(0, 256, n).astype(np.uint16)
    planted = (0, 63, 64, 127, 64 * 50 - 1, 64 * 50, n - 1)
    raw[list(planted)] = 0x7F00 | np.arange(len(planted), dtype=np.uint16)  # outside the table: escapes
    values = torch.from_numpy(raw.view(np.int16).copy()).view(torch.bfloat16)
    segment = _segment(values)
    _, _, _, m, coded, _, _ = _header(segment)
    assert coded == 1 and m == len(planted)
    for got in _all_paths(segment, values):
        assert torch.equal(_bits(got), _bits(values))


def _header(segment: torch.Tensor) -> list:
    return list(struct.unpack("<4sIQQII16s", bytes(segment[:48].numpy())))


def _with_header(segment: torch.Tensor, fields: list) -> torch.Tensor:
    out = segment.clone()
    out[:48] = torch.frombuffer(bytearray(struct.pack("<4sIQQII16s", *fields)), dtype=torch.uint8)
    return out


def test_torn_segments_are_errors():
    rng = np.random.default_rng(1)
    raw = (rng.integers(0x30, 0x30 + 15, 1000).astype(np.uint16) << 8) | rng.integers(0, 256, 1000).astype(np.uint16)
    raw[10] = 0x7F01  # one escape
    values = torch.from_numpy(raw.view(np.int16).copy()).view(torch.bfloat16)
    segment = _segment(values)
    assert _header(segment)[3:5] == [1, 1]  # one escape, coded
    out = torch.empty_like(values)
    fields = _header(segment)
    with pytest.raises(PackedCodingError, match="not a packed segment"):
        decode_into(_with_header(segment, [b"XXXX", *fields[1:]]), out)
    with pytest.raises(PackedCodingError, match="codes 1000 values, the tensor holds 999"):
        decode_into(segment, torch.empty(999, dtype=torch.bfloat16))
    with pytest.raises(PackedCodingError, match="needs .* bytes"):
        decode_into(segment[: segment.numel() - 64], out)
    with pytest.raises(PackedCodingError, match="needs .* bytes"):
        decode_into(_with_header(segment, [*fields[:3], 10**6, *fields[4:]]), out)  # escapes past the end
    # the escape's position moved onto a value coded from the table: torn, on every path
    lows_at = 64 + 512  # codes [500] rounded up to 64, after the header
    escapes_at = lows_at + 1024
    torn = segment.clone()
    torn[escapes_at : escapes_at + 4] = torch.frombuffer(bytearray(struct.pack("<I", 11)), dtype=torch.uint8)
    for simd in (True, False):
        with pytest.raises(PackedCodingError, match="torn"):
            decode_into(torn, out, simd=simd)
    torn[escapes_at : escapes_at + 4] = torch.frombuffer(bytearray(struct.pack("<I", 5000)), dtype=torch.uint8)
    with pytest.raises(PackedCodingError, match="torn"):
        decode_into(torn, out)
    with pytest.raises(ValueError, match="takes"):
        encode(torch.zeros(4, dtype=torch.float32))


def test_without_a_compiler_numpy_decodes_the_same(tmp_path):
    """No working C compiler (CC names one that fails): a warning, then the NumPy coder, the same values."""
    script = (
        "import torch\n"
        "from vllm_moe_offload.runtime import packed_codec as pc\n"
        "v = (torch.randn(3001) * 0.02).to(torch.bfloat16)\n"
        "s = torch.frombuffer(bytearray(pc.encode(v)), dtype=torch.uint8)\n"
        "o = torch.empty_like(v); pc.decode_into(s, o)\n"
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
