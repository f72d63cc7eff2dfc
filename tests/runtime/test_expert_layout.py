"""Experts stacked in one tensor per projection: one expert is one contiguous slice of each, read alone.

Real safetensors files in the layouts checkpoints use: Gemma-4 / Qwen3.5-MoE ``gate_up_proj`` [E, 2I, H] and
``down_proj`` [E, H, I]; Llama-4 / Qwen3-VL-MoE the same transposed, [E, H, 2I] and [E, I, H]; and a tensor
per expert with gate and up in one (``<e>.gate_up_proj.weight`` [2I, H]). The disk tier must hand the
converter exactly the per-expert ``w1, w3 [I, H]`` and ``w2 [H, I]`` vLLM's loader would cut out, having read
one expert's bytes; the stores build from the same slices.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from vllm_moe_offload.core.plan import READ_ALIGN_BYTES
from vllm_moe_offload.runtime.expert_layout import EXPERT, ExpertLayout, ProjectionSource, per_expert_layout
from vllm_moe_offload.runtime.expert_store import KERNEL, KernelLayout, LayerSpec, open_or_build, store_directory
from vllm_moe_offload.runtime.kernel_source import KernelSource
from vllm_moe_offload.runtime.quant import dequantize, quantize
from vllm_moe_offload.runtime.quant_source import QuantSource
from vllm_moe_offload.runtime.safetensors_io import CheckpointIndex
from vllm_moe_offload.runtime.tiers import DiskSource

E, I, H = 6, 64, 96  # H = 96: int4 groups of 64 pad w1/w3's input dimension
PREFIX = "model.language_model.layers.0.mlp.experts"


def _reference():
    """Every expert's w1, w3 [I, H] and w2 [H, I], as vLLM's loader cuts them."""
    torch.manual_seed(0)
    return [
        tuple((torch.randn(shape) * 0.05).to(torch.bfloat16) for shape in ((I, H), (I, H), (H, I))) for _ in range(E)
    ]


def _write(folder, ref, layout: str):
    """The checkpoint of ``ref`` in ``layout``, with an unrelated tensor first so no offset is aligned."""
    tensors = {"model.embed_tokens.weight": torch.randn(7, 13).to(torch.bfloat16)}
    gate_up = torch.stack([torch.cat([w1, w3]) for w1, w3, _ in ref])  # [E, 2I, H]
    down = torch.stack([w2 for _, _, w2 in ref])  # [E, H, I]
    if layout == "stacked":
        tensors |= {f"{PREFIX}.gate_up_proj": gate_up, f"{PREFIX}.down_proj": down}
    elif layout == "transposed":  # [E, H, 2I] and [E, I, H]
        tensors |= {f"{PREFIX}.gate_up_proj": gate_up.transpose(1, 2).contiguous(),
                    f"{PREFIX}.down_proj": down.transpose(1, 2).contiguous()}
    else:  # a tensor per expert, gate and up in one
        for e in range(E):
            tensors[f"{PREFIX}.{e}.gate_up_proj.weight"] = gate_up[e].clone()  # [2I, H]
            tensors[f"{PREFIX}.{e}.down_proj.weight"] = down[e].clone()  # [H, I]
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def _layout(layout: str) -> ExpertLayout:
    if layout == "per-expert gate_up":
        name = f"{PREFIX}.{EXPERT}.gate_up_proj.weight"
        return ExpertLayout(PREFIX, ProjectionSource(name, half=0), ProjectionSource(name, half=1),
                            ProjectionSource(f"{PREFIX}.{EXPERT}.down_proj.weight"))
    turned = layout == "transposed"
    gate_up = f"{PREFIX}.gate_up_proj"
    return ExpertLayout(
        PREFIX, ProjectionSource(gate_up, stacked=True, transposed=turned, half=0),
        ProjectionSource(gate_up, stacked=True, transposed=turned, half=1),
        ProjectionSource(f"{PREFIX}.down_proj", stacked=True, transposed=turned),
    )


def _as_read(w1, w3, w2, into=None):
    return torch.cat([w1, w3]), w2.contiguous()  # [2I, H], [H, I]


LAYOUTS = ["stacked", "transposed", "per-expert gate_up"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_disk_tier_reads_each_expert_alone_and_cuts_what_vllm_would(tmp_path, readers, layout):
    ref = _reference()
    index = CheckpointIndex(_write(tmp_path / "ckpt", ref, layout))
    source = DiskSource(index, _layout(layout), _as_read, readers, num_experts=E)
    expert_bytes = 3 * I * H * 2
    for e in range(E):
        got = source.fetch(e)
        w1, w3, w2 = ref[e]
        assert torch.equal(got.w13, torch.cat([w1, w3])) and torch.equal(got.w2, w2)
        # the expert's own bytes, widened to whole pages for O_DIRECT: never the stacked tensors whole
        assert expert_bytes <= got.bytes_read <= expert_bytes + 2 * 2 * READ_ALIGN_BYTES


def test_an_expert_slice_is_its_contiguous_share_of_the_tensor(tmp_path):
    index = CheckpointIndex(_write(tmp_path / "ckpt", _reference(), "transposed"))
    whole = index[f"{PREFIX}.gate_up_proj"]
    part = index.expert_slice(f"{PREFIX}.gate_up_proj", 4)
    assert part.num_bytes == whole.num_bytes // E and part.offset == whole.offset + 4 * part.num_bytes
    assert part.shape == (H, 2 * I) and part.dtype == torch.bfloat16
    with pytest.raises(IndexError, match=r"has no expert 6"):
        index.expert_slice(f"{PREFIX}.gate_up_proj", E)


def test_the_loader_skips_every_tensor_of_the_layout(tmp_path):
    assert _layout("stacked").all_tensor_names(E) == {f"{PREFIX}.gate_up_proj", f"{PREFIX}.down_proj"}
    per_expert = per_expert_layout(PREFIX, "gate_proj", "up_proj", "down_proj")
    assert len(per_expert.all_tensor_names(E)) == 3 * E
    assert _layout("per-expert gate_up").tensor_names(2) == [
        f"{PREFIX}.2.gate_up_proj.weight", f"{PREFIX}.2.down_proj.weight",
    ]


def test_a_stacked_tensor_of_other_experts_is_refused_at_start_up(tmp_path, readers):
    index = CheckpointIndex(_write(tmp_path / "ckpt", _reference(), "stacked"))
    with pytest.raises(ValueError, match=rf"{PREFIX}.down_proj is \[6, 96, 64\], not one \[8, out, in\] tensor"):
        DiskSource(index, _layout("stacked"), _as_read, readers, num_experts=8)


def test_stacked_packed_blocks_are_read_flat_one_expert_at_a_time(tmp_path, readers):
    # gpt-oss's MXFP4 experts: uint8 blocks [E, out, in/32, 16] (two FP4 values a byte), a uint8 scale per 32
    # inputs [E, out, in/32] and a bias [E, out], each read as vLLM's gpt-oss loader takes one expert: the blocks
    # as [out, in/2] bytes, gate and up whole (interleaved rows, no halves)
    from vllm_moe_offload.runtime.expert_layout import ExtraSource

    torch.manual_seed(0)
    w13 = torch.randint(0, 256, (E, 2 * I, H // 32, 16), dtype=torch.uint8)
    w2 = torch.randint(0, 256, (E, H, I // 32, 16), dtype=torch.uint8)
    scale = torch.randint(100, 130, (E, 2 * I, H // 32), dtype=torch.uint8)
    bias = torch.randn(E, 2 * I).to(torch.bfloat16)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    save_file({"model.embed_tokens.weight": torch.randn(7, 13).to(torch.bfloat16),
               f"{PREFIX}.gate_up_proj_blocks": w13, f"{PREFIX}.down_proj_blocks": w2,
               f"{PREFIX}.gate_up_proj_scales": scale, f"{PREFIX}.gate_up_proj_bias": bias},
              str(folder / "model.safetensors"))
    index = CheckpointIndex(folder)
    layout = ExpertLayout(
        PREFIX, ProjectionSource(f"{PREFIX}.gate_up_proj_blocks", stacked=True, flat=True), None,
        ProjectionSource(f"{PREFIX}.down_proj_blocks", stacked=True, flat=True),
        (ExtraSource("w13_weight_scale", "w1", ProjectionSource(f"{PREFIX}.gate_up_proj_scales", stacked=True)),
         ExtraSource("w13_bias", "w1", ProjectionSource(f"{PREFIX}.gate_up_proj_bias", stacked=True))),
    )
    assert layout.problems(index, E) == []
    assert layout.shapes(index) == [(2 * I, H // 2), (H, I // 2)]
    seen = []

    def convert(w1, w3, w2, into=None, extras=()):
        seen.append((w1.clone(), w3, w2.clone(), [(p, s, t.clone()) for p, s, t in extras]))
        return w1.clone(), w2.clone()

    source = DiskSource(index, layout, convert, readers, num_experts=E)
    source.fetch(3)
    (got_w13, got_w3, got_w2, extras), = seen
    assert got_w3 is None
    assert torch.equal(got_w13, w13[3].reshape(2 * I, H // 2)) and torch.equal(got_w2, w2[3].reshape(H, I // 2))
    assert [(p, s) for p, s, _ in extras] == [("w13_weight_scale", "w1"), ("w13_bias", "w1")]
    assert torch.equal(extras[0][2], scale[3]) and torch.equal(extras[1][2], bias[3])


class _Scaled:
    """A kernel layout unlike the checkpoint's: [H, 2I] and [I, H], doubled."""

    def __call__(self, w1, w3, w2, into=None):
        return (torch.cat([w1, w3]) * 2).t().contiguous(), (w2 * 2).t().contiguous()


def test_the_kernel_store_keeps_transposed_experts_turned_and_converted(tmp_path, readers):
    ref = _reference()
    folder = _write(tmp_path / "ckpt", ref, "transposed")
    kernel = KernelLayout({"vllm": "test"}, ((H, 2 * I), torch.bfloat16), ((I, H), torch.bfloat16), [_Scaled()])
    store = open_or_build(CheckpointIndex(folder), [LayerSpec(_layout("transposed"), E)], KERNEL,
                          store_directory(tmp_path / "stores", folder, KERNEL), readers, kernel)
    source = KernelSource(store, PREFIX, readers)
    for e in range(E):
        w1, w3, w2 = ref[e]
        got = source.fetch(e)
        assert torch.equal(got.w13, (torch.cat([w1, w3]) * 2).t()) and torch.equal(got.w2, (w2 * 2).t())


def test_the_quantized_store_quantizes_the_cut_projections(tmp_path, readers):
    ref = _reference()
    folder = _write(tmp_path / "ckpt", ref, "transposed")
    store = open_or_build(CheckpointIndex(folder), [LayerSpec(_layout("transposed"), E)], "int4",
                          store_directory(tmp_path / "stores", folder, "int4"), readers)
    source = QuantSource(store, PREFIX, _as_read, readers, torch.bfloat16)
    w1, w3, w2 = (dequantize(quantize(w, 4), torch.bfloat16) for w in ref[3])
    got = source.fetch(3)
    assert torch.equal(got.w13, torch.cat([w1, w3])) and torch.equal(got.w2, w2)
