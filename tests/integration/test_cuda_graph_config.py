"""The CUDA configuration rewrite of ``after_config``, checked on vLLM's own config objects (no engine, no GPU).

On CUDA the offloaded MoE op must stay out of captured graphs (its cache
decisions are made on the host each step) and the MoE kernel must take
remapped ids from outside.
"""

from __future__ import annotations

import logging

import pytest
import torch
from vllm.compilation.partition_rules import should_split
from vllm.config.compilation import CompilationConfig, CompilationMode, CUDAGraphMode
from vllm.config.kernel import KernelConfig

from vllm_moe_offload.integration.engine_config import MOE_OP, force_moe_backend, split_graphs_at_moe


def _compiled(mode: CUDAGraphMode) -> CompilationConfig:
    config = CompilationConfig(mode=CompilationMode.VLLM_COMPILE, cudagraph_mode=mode)
    config.set_splitting_ops_for_v1("allgather_reducescatter")  # what VllmConfig.__post_init__ does
    return config


@pytest.mark.parametrize(
    "mode", [CUDAGraphMode.FULL_AND_PIECEWISE, CUDAGraphMode.FULL, CUDAGraphMode.FULL_DECODE_ONLY],
)
def test_full_graphs_become_piecewise_split_at_the_moe_op(mode, caplog):
    config = _compiled(mode)
    attention_ops = list(config.splitting_ops)
    with caplog.at_level(logging.INFO, logger="vllm.moe_offload.config"):
        split_graphs_at_moe(config)
    assert config.cudagraph_mode == CUDAGraphMode.PIECEWISE
    assert config.splitting_ops == [*attention_ops, MOE_OP]  # vLLM's own splits kept
    assert f"cudagraph_mode {mode.name} would capture" in caplog.text


def test_piecewise_graphs_gain_the_split_once():
    config = _compiled(CUDAGraphMode.PIECEWISE)
    split_graphs_at_moe(config)
    split_graphs_at_moe(config)  # idempotent: after_config may see a config twice
    assert config.cudagraph_mode == CUDAGraphMode.PIECEWISE
    assert config.splitting_ops.count(MOE_OP) == 1


def test_no_graphs_means_no_change():
    config = _compiled(CUDAGraphMode.NONE)
    before = list(config.splitting_ops)
    split_graphs_at_moe(config)
    assert config.cudagraph_mode == CUDAGraphMode.NONE
    assert config.splitting_ops == before


def test_full_graphs_without_piecewise_compilation_are_turned_off():
    config = CompilationConfig(mode=CompilationMode.NONE, cudagraph_mode=CUDAGraphMode.FULL)
    split_graphs_at_moe(config)
    assert config.cudagraph_mode == CUDAGraphMode.NONE
    assert config.cudagraph_capture_sizes == []


def test_vllm_splits_its_graph_at_the_registered_op():
    """The name we add is the one vLLM's partitioner matches against the real custom op."""
    from vllm_moe_offload.integration.experts import register

    register()
    config = _compiled(CUDAGraphMode.FULL_AND_PIECEWISE)
    split_graphs_at_moe(config)
    graph = torch.fx.Graph()
    x, w, ids = graph.placeholder("x"), graph.placeholder("w"), graph.placeholder("ids")
    node = graph.call_function(torch.ops.vllm_moe_offload.routed_experts.default, (x, w, ids, "layer"))
    packet = graph.call_function(torch.ops.vllm_moe_offload.routed_experts, (x, w, ids, "layer"))
    other = graph.call_function(torch.ops.aten.add.Tensor, (x, x))
    assert should_split(node, config.splitting_ops)
    assert should_split(packet, config.splitting_ops)
    assert not should_split(other, config.splitting_ops)


def test_moe_backend_is_forced_to_one_that_takes_remapped_ids():
    kernel = KernelConfig()
    assert kernel.moe_backend == "auto"
    force_moe_backend(kernel)
    assert kernel.moe_backend == "triton"
    force_moe_backend(kernel)
    assert kernel.moe_backend == "triton"
    kernel.moe_backend = "flashinfer_trtllm"
    with pytest.raises(NotImplementedError, match="needs --moe-backend triton"):
        force_moe_backend(kernel)
