"""Checks of the torch-only runtime layer on a CUDA GPU (and, as far as they go, on a CPU).

Usage: ``python scripts/gpu_check.py [--device cuda|cpu] [--json OUT.json] [--quick]``.
Prints one ``PASS`` / ``FAIL`` / ``SKIPPED`` line per check, then ``JSON SUMMARY``
and the summary on one line; exits 1 when a check failed. Needs only torch and
this repository (no vLLM), so it runs on a bare GPU machine:

* slots: a decode-like run of :class:`LayerSlots` (LRU, fewer slots than experts,
  prefetches right and wrong, steps that need more experts than slots run in
  passes) through the transfer engine, from a pinned host source and from a
  pageable one (the staging ring); after every step a reference MoE forward
  (plain torch) over the slots with remapped ids must equal the same forward
  over all experts resident, bit for bit;
* quant: int4/int2 round trip of one expert on the device (when the quant module is present);
* overlap: expert copies on the engine's copy stream against matmuls on the
  compute stream, timed with CUDA events; the share of the shorter one hidden;
* bandwidth: host-to-device copy from pinned and from pageable memory, GB/s,
  against the PCIe link's nominal rate where ``nvidia-smi`` tells it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vllm_moe_offload.core.cache import SlotMap, pack_passes  # noqa: E402
from vllm_moe_offload.core.replacement import make_policy  # noqa: E402
from vllm_moe_offload.runtime.cuda_transfer import CudaTransferEngine  # noqa: E402
from vllm_moe_offload.runtime.slots import LayerSlots  # noqa: E402
from vllm_moe_offload.runtime.tiers import ExpertTensors, Into, TierKind, fill  # noqa: E402
from vllm_moe_offload.runtime.transfer import LinkEmulator  # noqa: E402

#: PCIe per-lane signalling rate (GT/s) by generation, and the line-code efficiency
_PCIE_GTS = {1: 2.5, 2: 5.0, 3: 8.0, 4: 16.0, 5: 32.0, 6: 64.0}


class TensorSource:
    """An expert source over in-memory tensors (the host tier without a checkpoint)."""

    tier = TierKind.HOST

    def __init__(self, w13: torch.Tensor, w2: torch.Tensor, pin: bool) -> None:
        # per expert, so each fetch hands over its own (pinned or pageable) tensors
        self._w13 = [t.pin_memory() if pin else t.clone() for t in w13]
        self._w2 = [t.pin_memory() if pin else t.clone() for t in w2]

    def fetch(self, expert_idx: int, into: Into = None) -> ExpertTensors:
        w13, w2 = fill(into, (self._w13[expert_idx], self._w2[expert_idx]))
        return ExpertTensors(w13, w2, w13.nbytes + w2.nbytes)

    def close(self) -> None:
        pass


def make_experts(num_experts: int, hidden: int, inter: int, dtype: torch.dtype, seed: int):
    """Random experts in the kernel layout: w13 [E, 2I, H] (gate rows, then up rows), w2 [E, H, I]."""
    gen = torch.Generator().manual_seed(seed)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, generator=gen) / hidden**0.5).to(dtype)
    w2 = (torch.randn(num_experts, hidden, inter, generator=gen) / inter**0.5).to(dtype)
    return w13, w2


def reference_moe(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor:
    """x [T, H], w13 [E, 2I, H], w2 [E, H, I], topk_weights [T, k], ids [T, k] -> [T, H].

    Per token, the sum over its top-k of weight x SwiGLU expert. One [1, H] matmul
    per (token, expert), so the result for a token never depends on which other
    tokens share the call or on the expert's index: slots and all-resident agree
    bit for bit when the weights are the same.
    """
    out = torch.zeros_like(x)
    inter = w2.shape[-1]
    for t in range(x.shape[0]):
        acc = torch.zeros_like(x[t : t + 1])  # [1, H]
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            gate_up = x[t : t + 1] @ w13[e].t()  # [1, 2I]
            act = torch.nn.functional.silu(gate_up[:, :inter]) * gate_up[:, inter:]  # [1, I]
            acc += topk_weights[t, j] * (act @ w2[e].t())  # [1, H]
        out[t] = acc[0]
    return out


def _route(gen: torch.Generator, tokens: int, num_experts: int, top_k: int, hot: int):
    """Skewed routing (most tokens pick among ``hot`` experts, so a cache hits): ids [T, k], weights [T, k]."""
    ids = torch.stack([
        torch.randperm(hot if torch.rand(1, generator=gen).item() < 0.7 else num_experts, generator=gen)[:top_k]
        for _ in range(tokens)
    ])
    weights = torch.rand(tokens, top_k, generator=gen).softmax(dim=-1)
    return ids, weights


def check_slots(device: torch.device, pinned: bool, steps: int = 12, num_layers: int = 2, num_experts: int = 8,
                num_slots: int = 3, top_k: int = 2, seed: int = 0) -> dict:
    """Run slot pools through decode-like steps; every output must equal the all-resident one.

    On a GPU the experts weigh 9 MiB (bf16), so a kernel that read a slot
    before its copy finished would see the previous expert; on a CPU they are
    small (the check is the same code, fast).
    """
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    hidden, inter = (1024, 1536) if device.type == "cuda" else (64, 96)
    expert_bytes = 3 * hidden * inter * dtype.itemsize
    engine = CudaTransferEngine(device, num_threads=2, max_expert_bytes=expert_bytes)
    gen = torch.Generator().manual_seed(seed)
    layers, resident = [], []
    try:
        for layer_idx in range(num_layers):
            w13, w2 = make_experts(num_experts, hidden, inter, dtype, seed + layer_idx)
            resident.append((w13.to(device), w2.to(device)))
            slots = LayerSlots(
                layer_idx,
                torch.empty((num_slots, 2 * inter, hidden), dtype=dtype, device=device),
                torch.empty((num_slots, hidden, inter), dtype=dtype, device=device),
                SlotMap(num_experts, num_slots, make_policy("lru", num_experts, num_slots, top_k)),
                TensorSource(w13, w2, pin=pinned and device.type == "cuda"), engine, LinkEmulator(),
            )
            slots.warm()
            layers.append(slots)
        mismatches, passes_used = 0, 0
        for step in range(steps):
            tokens = 1 if step % 3 else 6  # decode steps, and a small prefill-like step now and then
            routes = [_route(gen, tokens, num_experts, top_k, hot=4) for _ in layers]
            for layer_idx, (slots, (ids, weights)) in enumerate(zip(layers, routes)):
                if layer_idx + 1 < num_layers:  # prefetch the next layer: its true experts plus a wrong guess
                    nxt_ids = routes[layer_idx + 1][0]
                    layers[layer_idx + 1].prefetch(torch.unique(nxt_ids).tolist()[:1] + [step % num_experts])
                x = torch.randn(tokens, hidden, generator=gen).to(dtype).to(device)
                ids_d, weights_d = ids.to(device), weights.to(dtype).to(device)
                out = torch.empty_like(x)
                try:
                    for token_idx in pack_passes(ids.tolist(), slots.num_slots):
                        idx = torch.tensor(token_idx, device=device)
                        slots.ensure(torch.unique(ids[token_idx]).tolist())
                        out[idx] = reference_moe(x[idx], slots.w13_slots, slots.w2_slots, weights_d[idx],
                                                 slots.remap(ids_d[idx]))
                        passes_used += 1
                finally:
                    slots.end_step()
                want = reference_moe(x, *resident[layer_idx], weights_d, ids_d)
                mismatches += int(not torch.equal(out, want))
        total = {k: sum(s.stats.to_dict()[k] for s in layers) for k in ("hits", "misses", "loads", "prefetch_hits")}
        return {"mismatches": mismatches, "steps": steps * num_layers, "passes": passes_used, **total}
    finally:
        engine.shutdown()


def check_quant(device: torch.device) -> dict | None:
    """int4 / int2 round trip of one expert-sized matrix on ``device``; None when the module is absent."""
    try:
        from vllm_moe_offload.runtime.quant import dequantize, quantize
    except ImportError:
        return None
    w = torch.randn(512, 1024, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    out = {}
    for bits in (4, 2):
        q = quantize(w, bits)
        back = dequantize(q, torch.float32, device).cpu()  # dequantized on the device, as before use
        out[f"int{bits}_rel_err"] = float((back - w.float()).norm() / w.float().norm())
        out[f"int{bits}_device_equals_host"] = torch.equal(back, dequantize(q, torch.float32, "cpu"))
    return out


def measure_overlap(device: torch.device, num_experts: int = 16, expert_mib: int = 32, matmul_n: int = 4096) -> dict:
    """Expert copies (engine copy stream) against matmuls (compute stream), each alone and together."""
    numel = expert_mib * 2**20 // 2
    srcs = [torch.randn(numel, dtype=torch.bfloat16).pin_memory() for _ in range(num_experts)]
    dsts = torch.empty((num_experts, numel), dtype=torch.bfloat16, device=device)
    a = torch.randn(matmul_n, matmul_n, dtype=torch.bfloat16, device=device)
    engine = CudaTransferEngine(device, num_threads=1)

    def copies():
        return [engine.submit(engine.copy_in, (dsts[i],), (srcs[i],)) for i in range(num_experts)]

    def compute(reps):
        b = a
        for _ in range(reps):
            b = a @ b
        return b

    def timed(fn) -> float:
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    try:
        timed(lambda: [f.result() for f in copies()])  # warm-up: streams, pinned pages, cuBLAS
        copy_ms = timed(lambda: [f.result() for f in copies()])
        reps = 1
        while timed(lambda: compute(reps)) < copy_ms and reps < 4096:
            reps *= 2  # make compute about as long as the copies, so either could hide the other
        compute_ms = timed(lambda: compute(reps))

        def both():
            jobs = copies()  # fence recorded before the matmuls: copies may run under them
            compute(reps)
            for job in jobs:
                job.result()  # compute stream waits on each copy's event

        both_ms = timed(both)
        ok = torch.equal(dsts[-1].cpu(), srcs[-1])
    finally:
        engine.shutdown()
    hidden_ms = max(0.0, copy_ms + compute_ms - both_ms)
    return {
        "copy_ms": round(copy_ms, 3), "compute_ms": round(compute_ms, 3), "both_ms": round(both_ms, 3),
        "overlap_fraction": round(min(1.0, hidden_ms / min(copy_ms, compute_ms)), 3), "copied_right": ok,
        "copy_gbps": round(num_experts * expert_mib * 2**20 / copy_ms / 1e6, 2),
    }


def measure_bandwidth(device: torch.device, mib: int = 512) -> dict:
    """Host-to-device GB/s from pinned and from pageable memory, on a side stream, timed with events."""
    out = {}
    dst = torch.empty(mib * 2**20, dtype=torch.uint8, device=device)
    stream = torch.cuda.Stream(device)
    for kind in ("pinned", "pageable"):
        src = torch.empty(mib * 2**20, dtype=torch.uint8, pin_memory=kind == "pinned")
        src.fill_(1)
        best_ms = float("inf")
        for _ in range(3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(stream):
                start.record()
                dst.copy_(src, non_blocking=True)
                end.record()
            end.synchronize()
            best_ms = min(best_ms, start.elapsed_time(end))
        out[f"{kind}_gbps"] = round(mib * 2**20 / best_ms / 1e6, 2)
    out["link"] = pcie_link(device)
    if out["link"]:
        out["pinned_share_of_link"] = round(out["pinned_gbps"] / out["link"]["nominal_gbps"], 3)
    return out


def pcie_link(device: torch.device) -> dict | None:
    """The GPU's current PCIe generation and width from nvidia-smi, with the nominal GB/s."""
    try:
        line = subprocess.run(
            ["nvidia-smi", f"--id={device.index or 0}", "--query-gpu=pcie.link.gen.current,pcie.link.width.current",
             "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=20, check=True,
        ).stdout.strip()
        gen, width = (int(v) for v in line.split(","))
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    efficiency = 0.8 if gen <= 2 else 128 / 130  # 8b/10b, then 128b/130b line code
    return {"gen": gen, "width": width, "nominal_gbps": round(_PCIE_GTS.get(gen, 0) * efficiency / 8 * width, 2)}


def uva_anchor(model: str, offload_gb: float, decode_tokens: int = 128, prefill_tokens: int = 512) -> dict:
    """vLLM's own ``--cpu-offload-gb`` with ``cpu_offload_params={"experts"}``: batch-1 decode and prefill tok/s.

    The same measurements as ``vllm-moe-offload bench`` (batch-1 decode of
    ``decode_tokens``, one ``prefill_tokens``-token prompt), for its table.
    """
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, cpu_offload_gb=offload_gb, cpu_offload_params={"experts"}, max_model_len=2048,
              dtype="bfloat16", seed=0)
    greedy = SamplingParams(temperature=0.0, max_tokens=decode_tokens, ignore_eos=True)
    llm.generate([{"prompt_token_ids": [1, 2, 3]}], greedy, use_tqdm=False)  # warm-up
    started = time.perf_counter()
    llm.generate([{"prompt_token_ids": [1, 72, 101, 108, 108, 111]}], greedy, use_tqdm=False)
    decode_s = time.perf_counter() - started
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    started = time.perf_counter()
    llm.generate([{"prompt_token_ids": [1] + [65 + i % 26 for i in range(prefill_tokens - 1)]}], one, use_tqdm=False)
    prefill_s = time.perf_counter() - started
    return {"anchor": "vllm --cpu-offload-gb", "cpu_offload_gb": offload_gb, "cpu_offload_params": ["experts"],
            "decode_tok_s": round(decode_tokens / decode_s, 2), "prefill_tok_s": round(prefill_tokens / prefill_s, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, default=None, help="also write the summary here")
    parser.add_argument("--quick", action="store_true", help="fewer steps (for the CPU test)")
    parser.add_argument("--uva-anchor", metavar="MODEL", default=None,
                        help="instead of the checks: time vLLM's --cpu-offload-gb on MODEL's experts (needs vLLM)")
    parser.add_argument("--offload-gb", type=float, default=4.0, help="--cpu-offload-gb of the anchor (GiB)")
    args = parser.parse_args(argv)
    if args.uva_anchor:
        got = uva_anchor(args.uva_anchor, args.offload_gb)
        print(f"PASS uva_anchor: {json.dumps(got)}")
        if args.json:
            args.json.write_text(json.dumps(got, indent=2))
        return 0
    device = torch.device(args.device)
    summary: dict = {"device": str(device), "torch": torch.__version__, "checks": {}}
    if device.type == "cuda":
        summary["gpu"] = torch.cuda.get_device_name(device)
    failed = False

    def report(name: str, status: str, detail) -> None:
        nonlocal failed
        failed |= status == "FAIL"
        summary["checks"][name] = {"status": status, "detail": detail}
        print(f"{status} {name}: {json.dumps(detail)}", flush=True)

    steps = 6 if args.quick else 24
    for name, pinned in (("slots_pinned_source", True), ("slots_pageable_source_staged", False)):
        started = time.perf_counter()
        try:
            got = check_slots(device, pinned, steps=steps)
            got["seconds"] = round(time.perf_counter() - started, 2)
            ok = got["mismatches"] == 0 and got["misses"] > 0 and got["passes"] > got["steps"]
            report(name, "PASS" if ok else "FAIL", got)
        except Exception as exc:  # noqa: BLE001 - a check that raises is a failed check
            report(name, "FAIL", f"{type(exc).__name__}: {exc}")
    quant = check_quant(device)
    if quant is None:
        report("quant_roundtrip", "SKIPPED", "vllm_moe_offload.runtime.quant is not in this tree")
    else:
        # min-max round-to-nearest: int4 (group 64) stays within ~10% relative error, int2 (group 32) ~45%
        ok = quant["int4_rel_err"] < 0.15 and quant["int2_rel_err"] < 0.6
        report("quant_roundtrip", "PASS" if ok and quant["int4_device_equals_host"] and quant["int2_device_equals_host"]
               else "FAIL", quant)
    if device.type != "cuda":
        for name in ("copy_compute_overlap", "h2d_bandwidth"):
            report(name, "SKIPPED", "needs a CUDA device")
    else:
        for name, fn in (("copy_compute_overlap", measure_overlap), ("h2d_bandwidth", measure_bandwidth)):
            try:
                got = fn(device)
                ok = got.get("copied_right", True) and got.get("overlap_fraction", 1.0) > 0.5
                report(name, "PASS" if ok else "FAIL", got)
            except Exception as exc:  # noqa: BLE001
                report(name, "FAIL", f"{type(exc).__name__}: {exc}")
    summary["result"] = "FAIL" if failed else "PASS"
    print("JSON SUMMARY")
    print(json.dumps(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
