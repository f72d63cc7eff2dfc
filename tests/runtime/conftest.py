"""A small real safetensors checkpoint of MoE experts, and direct-I/O readers, for the expert-store tests."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from vllm_moe_offload.runtime.safetensors_io import ThreadLocalReaders
from vllm_moe_offload.runtime.expert_layout import ExpertLayout, per_expert_layout

E, I, H = 5, 64, 96  # H = 96: int4 groups of 64 need padding along w1/w3's input dimension
LAYERS = 2


def expert_names(layer_idx: int) -> ExpertLayout:
    return per_expert_layout(f"model.layers.{layer_idx}.block_sparse_moe.experts", "w1", "w3", "w2")


@pytest.fixture
def checkpoint(tmp_path):
    """(folder, tensors): LAYERS MoE layers of E experts (w1, w3 [I, H], w2 [H, I], bf16) and an embedding."""
    torch.manual_seed(0)
    tensors = {"model.embed_tokens.weight": torch.randn(10, H, dtype=torch.bfloat16)}
    for layer_idx in range(LAYERS):
        for e in range(E):
            for proj, shape in (("w1", (I, H)), ("w3", (I, H)), ("w2", (H, I))):
                tensors[f"{expert_names(layer_idx).prefix}.{e}.{proj}.weight"] = (torch.randn(shape) * 0.05).to(
                    torch.bfloat16
                )
    folder = tmp_path / "ckpt"
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"))
    return folder, tensors


@pytest.fixture
def readers():
    readers = ThreadLocalReaders(direct_io=True)
    yield readers
    readers.close()


def thp_setting() -> str | None:
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return None
    return text.split("[")[1].split("]")[0]


def huge_bytes_of(tensor: torch.Tensor) -> int:
    """AnonHugePages of the mapping that holds ``tensor`` (``/proc/self/smaps``), in bytes."""
    address, found = tensor.data_ptr(), None
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and ":" not in head:
            low, high = (int(x, 16) for x in head.split("-"))
            found = low <= address < high
        elif found and line.startswith("AnonHugePages:"):
            return int(line.split()[1]) * 1024
    return 0
