"""Group-wise asymmetric (min-max, round-to-nearest) quantization of 2-D weights.

A weight ``[R, C]`` is cut along its last, input dimension into groups of
``group`` elements; each group keeps a scale and an offset (the group's
minimum), and each element the integer ``q = round((w - offset) / scale)`` in
``[0, 2**bits - 1]``, so that ``w ~= q * scale + offset`` with an error of at
most ``scale / 2`` (Fate stores experts this way: int4 in groups of 64, int2 in
groups of 32).

Packing: ``8 // bits`` values per ``uint8``, the value of column ``j`` in bits
``[bits * (j % per_byte), bits * (j % per_byte + 1))`` of byte ``j // per_byte``
(low bits first: int4 puts even columns in the low nibble).

Scale and offset are float16 whatever the weight's dtype: 2 bytes each like
bf16, but 10 mantissa bits instead of 7, so they add less error to the grid;
their range (6e-8 to 65504) covers every weight we have seen. A weight outside
that range raises :class:`QuantizationError` instead of storing infinities. The
scale is rounded up and the offset down to float16, so the grid still spans
the whole group and the ``scale / 2`` bound holds.

Padding: when ``C`` is not a multiple of ``group``, each row is padded at the
end with copies of its last element up to the next multiple (copies never
widen the last group's range); the padded columns are stored and dropped again
by :func:`dequantize_into`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

#: bits -> group size (Fate: int4 in groups of 64, int2 in groups of 32)
GROUP_OF_BITS = {4: 64, 2: 32}

#: elements dequantized per chunk: bounds the float32 temporaries (about 1 MiB
#: each) instead of allocating full-size ones for a large expert
_CHUNK_ELEMS = 1 << 18


class QuantizationError(ValueError):
    """A weight that cannot be stored with this scheme (non-finite, or outside float16's range)."""


@dataclass(frozen=True)
class QuantTensor:
    """A quantized ``[R, C]`` weight (``Cp`` is ``C`` padded up to a multiple of ``group``)."""

    data: torch.Tensor  # [R, Cp * bits // 8] uint8, packed as in the module docstring
    scale: torch.Tensor  # [R, Cp // group] float16
    offset: torch.Tensor  # [R, Cp // group] float16, the group's minimum rounded down
    bits: int
    group: int
    shape: tuple[int, int]  # (R, C) of the original weight

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.scale.nbytes + self.offset.nbytes

    def to_bytes(self) -> bytes:
        """data, then scale, then offset, contiguous (the store's on-disk form)."""
        parts = (self.data, self.scale, self.offset)
        return b"".join(t.contiguous().view(torch.uint8).numpy().tobytes() for t in parts)

    @classmethod
    def from_bytes(cls, raw: torch.Tensor, shape: tuple[int, int], bits: int, group: int) -> QuantTensor:
        """Views into ``raw`` ([nbytes] uint8, as written by :meth:`to_bytes`); no copy."""
        rows, padded, groups = _dims(shape, bits, group)
        data_bytes, meta_bytes = rows * padded * bits // 8, rows * groups * 2
        if raw.numel() != data_bytes + 2 * meta_bytes:
            raise ValueError(f"{raw.numel()} bytes do not hold a {bits}-bit {list(shape)} weight "
                             f"({data_bytes + 2 * meta_bytes} expected)")
        data = raw[:data_bytes].view(rows, padded * bits // 8)
        scale = raw[data_bytes : data_bytes + meta_bytes].view(torch.float16).view(rows, groups)
        offset = raw[data_bytes + meta_bytes :].view(torch.float16).view(rows, groups)
        return cls(data, scale, offset, bits, group, tuple(shape))


def packed_nbytes(shape: tuple[int, int], bits: int, group: int) -> int:
    """Bytes of :meth:`QuantTensor.to_bytes` for a weight of ``shape``."""
    rows, padded, groups = _dims(shape, bits, group)
    return rows * padded * bits // 8 + 2 * rows * groups * 2


def _dims(shape: tuple[int, int], bits: int, group: int) -> tuple[int, int, int]:
    if bits not in GROUP_OF_BITS:
        raise ValueError(f"{bits}-bit quantization is not supported; allowed: {sorted(GROUP_OF_BITS)}")
    if group <= 0 or group % (8 // bits):
        raise ValueError(f"group {group} must be a positive multiple of {8 // bits} for {bits}-bit values")
    rows, cols = shape
    padded = -(-cols // group) * group
    return rows, padded, padded // group


def quantize(w: torch.Tensor, bits: int, group: int | None = None) -> QuantTensor:
    """Quantize ``w`` ([R, C], any float dtype) to ``bits`` per element in groups of ``group``."""
    if w.dim() != 2:
        raise ValueError(f"quantize takes a 2-D weight, got shape {list(w.shape)}")
    group = GROUP_OF_BITS.get(bits, 0) if group is None else group
    rows, padded, groups = _dims(tuple(w.shape), bits, group)
    w32 = w.detach().to(torch.float32)  # [R, C]
    if not torch.isfinite(w32).all():
        raise QuantizationError(f"weight {list(w.shape)} has non-finite values")
    if padded != w.shape[1]:
        w32 = F.pad(w32[None], (0, padded - w.shape[1]), mode="replicate")[0]  # [R, Cp]
    g = w32.view(rows, groups, group)  # [R, G, group]
    qmax = (1 << bits) - 1
    offset = _fp16_toward(g.amin(-1), -1.0)  # [R, G], <= the group's minimum
    scale = _fp16_toward((g.amax(-1) - offset.float()) / qmax, 1.0)  # [R, G], grid reaches the maximum
    if not (torch.isfinite(offset).all() and torch.isfinite(scale).all()):
        raise QuantizationError(
            f"weight {list(w.shape)} has values (max |w| {w32.abs().max().item():.3g}) outside float16's range, "
            "which the quantized store keeps scales in"
        )
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # constant group: every q is 0
    q = ((g - offset.float()[..., None]) / scale.float()[..., None]).round_().clamp_(0, qmax).to(torch.uint8)
    per_byte = 8 // bits
    q = q.view(rows, padded // per_byte, per_byte)  # [R, Cp / per_byte, per_byte]
    data = torch.zeros((rows, padded // per_byte), dtype=torch.uint8)
    for k in range(per_byte):
        data |= q[..., k] << (bits * k)
    return QuantTensor(data, scale, offset, bits, group, (rows, w.shape[1]))


def _fp16_toward(x: torch.Tensor, direction: float) -> torch.Tensor:
    """float32 -> float16, rounded down (direction -1) or up (+1) instead of to nearest."""
    h = x.to(torch.float16)
    off = (h.float() - x) * direction < 0  # rounded the wrong way
    if off.any():
        h[off] = torch.nextafter(h[off], torch.full_like(h[off], direction * float("inf")))
    return h


def dequantize_into(q: QuantTensor, out: torch.Tensor) -> torch.Tensor:
    """Write the dequantized weight into ``out`` ([R, C], any float dtype); returns ``out``.

    Works in row chunks so the float32 temporaries stay small whatever the
    weight's size; ``out`` is the only full-size tensor.
    """
    rows, cols = q.shape
    if tuple(out.shape) != (rows, cols):
        raise ValueError(f"out has shape {list(out.shape)}, the quantized weight {[rows, cols]}")
    per_byte = 8 // q.bits
    padded = q.data.shape[1] * per_byte
    groups = padded // q.group
    mask = (1 << q.bits) - 1
    step = max(1, _CHUNK_ELEMS // padded)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        data = q.data[r0:r1]  # [r, Cp / per_byte] uint8
        vals = torch.empty((r1 - r0, data.shape[1], per_byte), dtype=torch.float32, device=data.device)
        for k in range(per_byte):  # one strided copy per position in the byte: faster than broadcast shifts
            part = data >> (q.bits * k) if k else data
            vals[..., k].copy_(part & mask if k < per_byte - 1 else part)
        w = vals.view(r1 - r0, groups, q.group)  # [r, G, group]
        w.mul_(q.scale[r0:r1, :, None].float()).add_(q.offset[r0:r1, :, None].float())
        out[r0:r1].copy_(w.view(r1 - r0, padded)[:, :cols])
    return out


def dequantize(q: QuantTensor, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """A fresh ``[R, C]`` tensor of ``dtype`` holding the dequantized weight."""
    return dequantize_into(q, torch.empty(q.shape, dtype=dtype, device=device))
