"""What offload's passes and waves rely on: does vLLM's CPU MoE kernel give a token the same bits in any call?

Offload computes a step's tokens in several kernel calls (passes when the step needs more experts than
slots, waves as loads land). That is exact only where a token's result does not depend on the other tokens
of the call. These tests call vLLM's kernels directly on random experts and compare each row of one
40-token call with the same row computed in calls of 1 to 33 tokens.
"""

from __future__ import annotations

import pytest
import torch

from vllm_moe_offload.runtime.amx import cpu_reports_amx, request_amx_permission

H, I, E, K, T, BLOCK = 256, 128, 8, 2, 40, 128
CALL_SIZES = (1, 2, 3, 5, 8, 16, 20, 33)


def _rows_differing(run) -> dict[int, int]:
    """Call size -> rows whose result differs from the same row in one call of all T rows."""
    full = run(list(range(T)))
    differing = {}
    for m in CALL_SIZES:
        differing[m] = sum(
            int((run(rows) != full[rows]).any(dim=-1).sum())
            for rows in (list(range(start, start + m)) for start in range(0, T - m + 1, m))
        )
    return differing


def _inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=gen).bfloat16()
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)]).int()
    weights = torch.rand(T, K, generator=gen)
    w13 = torch.randn(E, 2 * I, H, generator=gen) / H**0.5
    w2 = torch.randn(E, H, I, generator=gen) / I**0.5
    return x, ids, weights, w13, w2


@pytest.mark.parametrize("isa", ["vec", "amx"])
def test_unquantized_kernel_gives_each_token_the_same_bits_in_any_call(isa):
    if isa == "amx" and not cpu_reports_amx():
        pytest.skip("this CPU reports no AMX")
    request_amx_permission()
    from vllm._custom_ops import cpu_fused_moe, cpu_prepack_moe_weight

    x, ids, weights, w13, w2 = _inputs()
    p13, p2 = cpu_prepack_moe_weight(w13.bfloat16(), isa), cpu_prepack_moe_weight(w2.bfloat16(), isa)

    def run(rows):
        out = torch.empty(len(rows), H, dtype=torch.bfloat16)
        cpu_fused_moe(out, x[rows], p13, p2, None, None, weights[rows], ids[rows], "silu", isa)
        return out

    assert _rows_differing(run) == dict.fromkeys(CALL_SIZES, 0)


def _fp8_call(w13, w2):
    """vLLM's CPU FP8 MoE kernel on ``w13``/``w2`` quantized per 128 x 128 block (scale = absmax / 448):
    ``call(x, topk_weights, topk_ids) -> out``."""
    from vllm._custom_ops import CPUQuantMethod, fused_experts_cpu

    def quantize(w):
        e, n, k = w.shape
        blocks = w.view(e, n // BLOCK, BLOCK, k // BLOCK, BLOCK)
        scale = blocks.abs().amax(dim=(2, 4)) / 448.0
        fp8 = (blocks / scale[:, :, None, :, None]).view(e, n, k).to(torch.float8_e4m3fn)
        return torch.ops._C.convert_weight_packed(fp8), scale.float()

    (q13, s13), (q2, s2) = quantize(w13), quantize(w2)

    def call(x, topk_weights, topk_ids):
        out = torch.empty(len(x), H, dtype=torch.bfloat16)
        fused_experts_cpu(out, x, q13, q2, topk_weights, topk_ids, CPUQuantMethod.FP8_W8A16,
                          s13, s2, None, None, [BLOCK, BLOCK], None, None, None, None, True)
        return out

    return call


def test_fp8_kernel_gives_a_token_other_bits_in_a_smaller_call():
    """Why a quantized layer's split calls need padding (integration/kernel_blocks.py).

    If this fails because every row agrees, vLLM's FP8 kernel became batch-invariant and the padding
    is no longer needed.
    """
    if not cpu_reports_amx():
        pytest.skip("vLLM's CPU FP8 MoE kernel needs AMX")
    request_amx_permission()
    x, ids, weights, w13, w2 = _inputs()

    call = _fp8_call(w13, w2)

    def run(rows):
        return call(x[rows], weights[rows], ids[rows])

    differing = _rows_differing(run)
    print("rows differing from the 40-token call, by call size:", differing)
    assert differing[1] > 0


def test_fp8_kernel_paths_follow_block_sizes_and_padding_restores_the_full_calls_bits():
    """What ``integration/kernel_blocks.py`` relies on: a row's bits depend on whether its expert block (rows
    of one expert, ``BLOCK_M`` at a time, in token order) is larger than ``SMALL_BLOCK``, and
    ``stock_paths_call``'s dummy rows give every row of any part of a call the whole call's bits."""
    if not cpu_reports_amx():
        pytest.skip("vLLM's CPU FP8 MoE kernel needs AMX")
    request_amx_permission()
    from vllm_moe_offload.integration.kernel_blocks import BLOCK_M, SMALL_BLOCK, stock_paths_call

    gen = torch.Generator().manual_seed(1)
    t = 3 * BLOCK_M + 8  # an expert with more than two blocks
    x = torch.randn(t, H, generator=gen).bfloat16()
    weights = torch.rand(t, K, generator=gen)
    w13 = torch.randn(E, 2 * I, H, generator=gen) / H**0.5
    w2 = torch.randn(E, H, I, generator=gen) / I**0.5

    call = _fp8_call(w13, w2)

    # every row on experts 0 and 1: a row's block size alone decides its path
    same = torch.tensor([[0, 1]] * t, dtype=torch.int32)
    full = call(x, weights, same)
    differs = [m for m in range(1, t + 1) if (call(x[:m], weights[:m], same[:m]) != full[:m]).any()]
    assert differs == [m for m in range(1, t + 1) if 0 < m % BLOCK_M <= SMALL_BLOCK]

    # mixed routing, the step split into parts by expert sets as offload's passes do: padded parts are exact
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(t)]).int()
    ids[: 2 * BLOCK_M + 2, 0] = 3  # expert 3: 66 + some rows, a small last block in the whole call
    ids[: 2 * BLOCK_M + 2, 1] = torch.where(ids[: 2 * BLOCK_M + 2, 1] == 3, 4, ids[: 2 * BLOCK_M + 2, 1])
    full = call(x, weights, ids)
    unpadded = padded = 0
    for part in (ids[:, 1] < 4, ids[:, 1] >= 4):  # two parts of the step, by the second expert
        idx = part.nonzero().flatten()
        xx, ww, slot_ids, n = stock_paths_call(idx, x[idx], weights[idx], ids[idx], ids, E)
        padded += int((call(xx, ww, slot_ids)[n:] != full[idx]).any(dim=-1).sum())
        unpadded += int((call(x[idx], weights[idx], ids[idx]) != full[idx]).any(dim=-1).sum())
    assert unpadded > 0, "the parts gave the whole call's bits without padding: the test shows nothing"
    assert padded == 0
