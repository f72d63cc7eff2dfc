"""Experts with scales beside their weights (FP8 block checkpoints): every tier hands out all of an expert's tensors.

A real safetensors checkpoint stores each projection's ``weight`` (float8_e4m3fn) and ``weight_scale_inv``
(float32), as the FP8 releases do (safetensors puts the float32 scales apart from the weights). The layout's
extras name the scales; the disk tier passes them to the converter as ``(param, shard_id, tensor)``, and a
fetch, the host tier and the kernel store give ``(w13, w2, *scales)`` into a slot of every pool.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from vllm_moe_offload.runtime.expert_layout import EXPERT, ExtraSource, ProjectionSource, per_expert_layout
from vllm_moe_offload.runtime.expert_store import KERNEL, MANIFEST, KernelLayout, LayerSpec, open_or_build
from vllm_moe_offload.runtime.kernel_source import KernelSource
from vllm_moe_offload.runtime.safetensors_io import ALIGN_BYTES, CheckpointIndex
from vllm_moe_offload.runtime.tiers import DiskSource, HostSource

E, I, H, BLOCK = 4, 128, 256, 128
PREFIX = "model.layers.0.mlp.experts"
PROJ = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
SHAPES = {"w1": (I, H), "w3": (I, H), "w2": (H, I)}


def _layout():
    base = per_expert_layout(PREFIX, "gate_proj", "up_proj", "down_proj")
    extras = tuple(
        ExtraSource("w2_weight_scale_inv" if shard == "w2" else "w13_weight_scale_inv", shard,
                    ProjectionSource(f"{PREFIX}.{EXPERT}.{proj}.weight_scale_inv"))
        for shard, proj in PROJ.items()
    )
    return type(base)(base.prefix, base.gate, base.up, base.down, extras)


@pytest.fixture
def fp8_checkpoint(tmp_path):
    torch.manual_seed(0)
    tensors = {"model.embed_tokens.weight": torch.randn(7, 13).to(torch.bfloat16)}
    for e in range(E):
        for shard, proj in PROJ.items():
            rows, cols = SHAPES[shard]
            tensors[f"{PREFIX}.{e}.{proj}.weight"] = torch.randn(rows, cols).to(torch.float8_e4m3fn)
            tensors[f"{PREFIX}.{e}.{proj}.weight_scale_inv"] = torch.rand(rows // BLOCK, cols // BLOCK) + e
    folder = tmp_path / "ckpt"
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"))
    return folder, tensors


class Stacking:
    """A converter that keeps the checkpoint's layout: w13 = [w1; w3], and the scales stacked the same way."""

    def __init__(self) -> None:
        self.extras = []

    def __call__(self, w1, w3, w2, into=None, extras=()):
        self.extras.append([(param, shard, tuple(t.shape)) for param, shard, t in extras])
        scale = {shard: t for _, shard, t in extras}
        out = (torch.cat([w1, w3]), w2.clone(), torch.cat([scale["w1"], scale["w3"]]), scale["w2"].clone())
        if into is None:
            return out
        for dst, src in zip(into, out):
            dst.copy_(src)
        return into


def _want(tensors, e):
    get = {shard: (tensors[f"{PREFIX}.{e}.{proj}.weight"], tensors[f"{PREFIX}.{e}.{proj}.weight_scale_inv"])
           for shard, proj in PROJ.items()}
    return (torch.cat([get["w1"][0], get["w3"][0]]), get["w2"][0], torch.cat([get["w1"][1], get["w3"][1]]),
            get["w2"][1])


def _pools(slots: int):
    fp8 = torch.float8_e4m3fn
    return (torch.zeros(slots, 2 * I, H, dtype=fp8), torch.zeros(slots, H, I, dtype=fp8),
            torch.zeros(slots, 2 * I // BLOCK, H // BLOCK), torch.zeros(slots, H // BLOCK, I // BLOCK))


def _equal(got, want) -> bool:
    return all(torch.equal(a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
                           b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b) for a, b in zip(got, want))


def test_the_disk_tier_reads_scales_with_weights_and_fills_every_pool(fp8_checkpoint, readers):
    folder, tensors = fp8_checkpoint
    index = CheckpointIndex(folder)
    layout = _layout()
    assert len(layout.tensor_names(0)) == 6 and f"{PREFIX}.0.down_proj.weight_scale_inv" in layout.tensor_names(0)
    assert len(layout.all_tensor_names(E)) == 6 * E  # what vLLM's loader skips
    convert = Stacking()
    disk = DiskSource(index, layout, convert, readers, num_experts=E)
    pools = _pools(2)
    for e in range(E):
        got = disk.fetch(e, into=tuple(p[1] for p in pools))
        assert [t.data_ptr() for t in got.tensors] == [p[1].data_ptr() for p in pools]
        assert _equal(got.tensors, _want(tensors, e))
    assert convert.extras[0] == [("w13_weight_scale_inv", "w1", (1, 2)), ("w13_weight_scale_inv", "w3", (1, 2)),
                                 ("w2_weight_scale_inv", "w2", (2, 1))]
    host = HostSource(disk, E, pin=False)
    assert host.num_bytes == E * sum(p[0].nbytes for p in pools)
    for e in range(E):
        got = host.fetch(e, into=tuple(p[0] for p in pools))
        assert _equal(got.tensors, _want(tensors, e)) and got.bytes_read == sum(p[0].nbytes for p in pools)


def test_the_kernel_store_keeps_every_tensor_of_an_expert(fp8_checkpoint, tmp_path, readers):
    folder, tensors = fp8_checkpoint
    pools = _pools(1)
    parts = [(tuple(p.shape[1:]), p.dtype) for p in pools]
    kernel = KernelLayout({"vllm": "test"}, parts[0], parts[1], [Stacking()], tuple(parts[2:]))
    store = open_or_build(CheckpointIndex(folder), [LayerSpec(_layout(), E)], KERNEL, tmp_path / "store", readers,
                          kernel)
    record = json.loads((store.directory / MANIFEST).read_text())["precisions"][KERNEL]
    assert record["w2_offset"] % ALIGN_BYTES == 0
    assert [x["offset"] for x in record["extra"]] == kernel.offsets[2:]
    assert kernel.offsets[2] >= kernel.offsets[1] + H * I and kernel.offsets[2] % 64 == 0
    source = KernelSource(store, PREFIX, readers)
    for e in range(E):
        got = source.fetch(e, into=tuple(p[0] for p in pools))
        assert _equal(got.tensors, _want(tensors, e)) and len(got.extra) == 2
        assert _equal(source.fetch(e).tensors, _want(tensors, e))  # fresh tensors, no slot
