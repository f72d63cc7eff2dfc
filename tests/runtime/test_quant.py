"""Group-wise int4/int2 quantization: error bound, exactness on the grid, packing, padding."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_moe_offload.runtime.quant import (
    GROUP_OF_BITS,
    QuantizationError,
    QuantTensor,
    dequantize,
    dequantize_into,
    packed_nbytes,
    quantize,
)


def _scale_per_element(q: QuantTensor) -> torch.Tensor:
    """[R, C] float32: the scale of each element's group."""
    return q.scale.float().repeat_interleave(q.group, dim=1)[:, : q.shape[1]]


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("shape", [(16, 256), (5, 100), (3, 1)])
def test_round_trip_error_at_most_half_a_step(bits, shape):
    torch.manual_seed(0)
    w = torch.randn(shape) * 0.02
    q = quantize(w, bits)
    back = dequantize(q, torch.float32)
    # scale / 2 plus float32 rounding of q * scale + offset
    bound = _scale_per_element(q) / 2 * (1 + 1e-5) + 1e-9
    assert (back - w).abs().le(bound).all()


def test_bf16_output_adds_only_bf16_rounding():
    torch.manual_seed(1)
    w = (torch.randn(32, 192) * 0.05).to(torch.bfloat16)
    q = quantize(w, 4)
    back = dequantize(q, torch.bfloat16).float()
    exact = dequantize(q, torch.float32)
    assert torch.equal(back, exact.to(torch.bfloat16).float())
    bound = _scale_per_element(q) / 2 * (1 + 1e-5) + exact.abs() * 2.0**-8
    assert (back - w.float()).abs().le(bound).all()


@pytest.mark.parametrize("bits", [4, 2])
def test_values_on_the_grid_are_exact(bits):
    group, qmax = GROUP_OF_BITS[bits], (1 << bits) - 1
    gen = torch.Generator().manual_seed(2)
    rows, groups = 4, 3
    q_vals = torch.randint(0, qmax + 1, (rows, groups, group), generator=gen)
    q_vals[..., 0], q_vals[..., 1] = 0, qmax  # each group spans the whole grid
    scale = 2.0 ** -torch.randint(4, 10, (rows, groups, 1), generator=gen).float()  # exact in float16
    offset = torch.randint(-64, 64, (rows, groups, 1), generator=gen).float() / 128
    w = (q_vals * scale + offset).view(rows, groups * group)
    assert torch.equal(dequantize(quantize(w, bits), torch.float32), w)


def test_int4_packing_layout():
    w = torch.tensor([[0.0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15] * 4])  # [1, 64]: one group
    q = quantize(w, 4)
    assert q.scale.item() == 1.0 and q.offset.item() == 0.0
    assert q.data.shape == (1, 32) and q.data.dtype == torch.uint8
    assert q.data[0, :3].tolist() == [0x10, 0x32, 0x54]  # even column in the low nibble


def test_int2_packing_layout():
    w = torch.tensor([[0.0, 1, 2, 3, 3, 2, 1, 0] * 4])  # [1, 32]: one group
    q = quantize(w, 2)
    assert q.data.shape == (1, 8)
    assert q.data[0, :2].tolist() == [0b11100100, 0b00011011]  # column 4j + k in bits 2k


def test_padding_when_columns_are_not_a_multiple_of_the_group():
    w = torch.linspace(-1, 1, 2 * 70).view(2, 70)
    q = quantize(w, 4)
    assert q.data.shape == (2, 64) and q.scale.shape == (2, 2)  # 70 -> 128 columns
    # the padding copies the last element, so the last group's range is its own
    assert q.offset[0, 1].item() == pytest.approx(w[0, 64].item(), abs=1e-3)
    back = dequantize(q, torch.float32)
    assert back.shape == (2, 70)
    assert (back - w).abs().le(_scale_per_element(q) / 2 + 1e-6).all()


def test_int2_error_larger_than_int4():
    torch.manual_seed(3)
    w = torch.randn(64, 512)
    err = {bits: (dequantize(quantize(w, bits), torch.float32) - w).pow(2).mean().item() for bits in (4, 2)}
    assert err[2] > 4 * err[4]


def test_serialization_round_trip_and_size():
    torch.manual_seed(4)
    w = torch.randn(24, 200)
    for bits in (4, 2):
        q = quantize(w, bits)
        raw = q.to_bytes()
        assert len(raw) == q.nbytes == packed_nbytes((24, 200), bits, GROUP_OF_BITS[bits])
        again = QuantTensor.from_bytes(torch.frombuffer(bytearray(raw), dtype=torch.uint8), (24, 200), bits,
                                       GROUP_OF_BITS[bits])
        assert torch.equal(dequantize(again, torch.float32), dequantize(q, torch.float32))
    with pytest.raises(ValueError, match="do not hold"):
        QuantTensor.from_bytes(torch.zeros(10, dtype=torch.uint8), (24, 200), 4, 64)


def test_constant_group_and_chunked_dequantize():
    w = torch.full((3000, 64), 0.25)  # 3000 * 64 elements: several dequantize chunks
    w[-1, 0] = 1.0
    q = quantize(w, 4)
    out = torch.empty(3000, 64, dtype=torch.bfloat16)
    assert dequantize_into(q, out) is out
    assert torch.equal(out[:-1].float(), w[:-1])
    with pytest.raises(ValueError, match="out has shape"):
        dequantize_into(q, torch.empty(3000, 63))


def test_unquantizable_weights_are_refused():
    with pytest.raises(QuantizationError, match="non-finite"):
        quantize(torch.tensor([[1.0, float("nan")]]), 4)
    with pytest.raises(QuantizationError, match="float16's range"):
        quantize(torch.tensor([[0.0, 1e6]]), 4)
    with pytest.raises(ValueError, match="3-bit"):
        quantize(torch.zeros(2, 8), 3)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 6), cols=st.integers(1, 150), bits=st.sampled_from([2, 4]),
    magnitude=st.floats(1e-3, 1e3), seed=st.integers(0, 2**31 - 1),
)
def test_error_bound_holds_for_any_shape_and_scale(rows, cols, bits, magnitude, seed):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * magnitude
    q = quantize(w, bits)
    back = dequantize(q, torch.float32)
    assert back.shape == w.shape
    bound = _scale_per_element(q) / 2 * (1 + 1e-5) + w.abs() * 2e-7
    assert (back - w).abs().le(bound).all()
