"""Quality of int4 / int2 experts on the trained tiny-mixtral: perplexity and top-1 agreement with stock.

Usage (from the repository root, in .venv):
    python scripts/measure/quant_quality.py OUT_DIR [--seqs 16 --seq-len 256]

Makes copies of the checkpoint whose experts hold their int4 / int2 dequantized
values (what the quantized tier computes; tests/integration/test_quant.py checks
the plugin equals stock on such a copy token for token), runs stock vLLM (plugin
off) on each with prompt logprobs over held-out tokens, and also the plugin with
quant int4 (lru, 50%) on the original checkpoint. Prints a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

#: the trained tiny model beside the repository (../shared), never copied into it
MODEL = Path(__file__).resolve().parents[3] / "shared" / "models" / "tiny-mixtral"
HELDOUT = MODEL.parent / "tiny-mixtral-heldout-tokens.npy"


def _run(job: dict) -> dict:
    """In a child process: one engine per model, prompt logprobs + greedy continuations."""
    from vllm import LLM, SamplingParams

    out = {}
    for name, spec in job["models"].items():
        llm = LLM(model=spec["path"], dtype="bfloat16", max_model_len=1024, kv_cache_memory_bytes=128 * 2**20,
                  enforce_eager=True, seed=0, additional_config=spec.get("additional_config") or {})
        scored = llm.generate([{"prompt_token_ids": s} for s in job["seqs"]],
                              SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=0.0), use_tqdm=False)
        actual, top1 = [], []
        for seq, o in zip(job["seqs"], scored):
            for tok, lp in zip(seq[1:], o.prompt_logprobs[1:]):
                actual.append(lp[tok].logprob)
                top1.append(next(t for t, v in lp.items() if v.rank == 1))
        greedy = llm.generate([{"prompt_token_ids": p} for p in job["prompts"]],
                              SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True), use_tqdm=False)
        out[name] = {"logprobs": actual, "top1": top1, "greedy": [list(g.outputs[0].token_ids) for g in greedy]}
        del llm
    return out


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        job = json.loads(Path(sys.argv[2]).read_text())
        Path(job["out"]).write_text(json.dumps(_run(job)))
        return
    import numpy as np

    from vllm_moe_offload.runtime.expert_store import SCHEMES  # noqa: F401 - the plugin is importable
    from vllm_moe_offload.runtime.quant_reference import write_dequantized_checkpoint

    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--seqs", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    args = ap.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    tokens = np.load(HELDOUT).astype(np.int64)
    seqs = [[1] + tokens[i * args.seq_len : (i + 1) * args.seq_len].tolist() for i in range(args.seqs)]
    base = args.seqs * args.seq_len
    prompts = [[1] + tokens[base + i * 64 : base + i * 64 + 16].tolist() for i in range(4)]
    models = {"stock": {"path": str(MODEL)}}
    for bits in (4, 2):
        dst = args.out_dir / f"tiny-mixtral-int{bits}"
        if not dst.exists():
            write_dequantized_checkpoint(MODEL, dst, bits)
        models[f"int{bits}-reference"] = {"path": str(dst)}
    plugin = {"plugin-int4": {"path": str(MODEL), "additional_config": {
        "moe_offload": {"policy": "lru", "budget": "50%", "quant": "int4"}}}}
    results = {}
    for label, group, stock in (("stock", models, True), ("plugin", plugin, False)):
        job = {"models": group, "seqs": seqs, "prompts": prompts, "out": str(args.out_dir / f"{label}.json")}
        (args.out_dir / f"{label}-job.json").write_text(json.dumps(job))
        env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CACHE_ROOT=str(args.out_dir / "cache"),
                   VLLM_RPC_BASE_PATH=str(args.out_dir / "rpc"))
        (args.out_dir / "rpc").mkdir(exist_ok=True)
        if stock:
            env["VLLM_PLUGINS"] = "moe_offload_amx"  # stock vLLM with the plugin's AMX permission alone
        with open(args.out_dir / f"{label}.log", "w") as log:
            subprocess.run([sys.executable, __file__, "--child", str(args.out_dir / f"{label}-job.json")],
                           env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
        results.update(json.loads(Path(job["out"]).read_text()))
    ref = results["stock"]
    summary = {"tokens_scored": len(ref["logprobs"])}
    for name, r in results.items():
        nll = -float(np.mean(r["logprobs"]))
        top1 = float(np.mean(np.array(r["top1"]) == np.array(ref["top1"])))
        greedy = [a == b for ga, gb in zip(r["greedy"], ref["greedy"]) for a, b in zip(ga, gb)]
        first_diff = [next((i for i, (a, b) in enumerate(zip(ga, gb)) if a != b), len(ga))
                      for ga, gb in zip(r["greedy"], ref["greedy"])]
        summary[name] = {
            "perplexity": round(float(np.exp(nll)), 3),
            "perplexity_change_pct": round(100 * (np.exp(nll) / np.exp(-np.mean(ref["logprobs"])) - 1), 2),
            "top1_agreement_heldout": round(top1, 4),
            "greedy_token_agreement": round(float(np.mean(greedy)), 4),
            "greedy_first_divergence": first_diff,
        }
    summary["plugin_int4_equals_int4_reference"] = (
        results["plugin-int4"]["top1"] == results["int4-reference"]["top1"]
        and results["plugin-int4"]["greedy"] == results["int4-reference"]["greedy"]
    )
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
