"""Bench rows of quantized experts against bf16 on the same padded model (issue 16).

Makes the x16 padded tiny-mixtral (3 MiB bf16 experts), its FP8 block-128 and AWQ int4 copies
(``vllm-moe-offload quantize-model``), runs ``vllm-moe-offload bench`` on each with the same policies,
budgets and prompts, and prints one table: expert bytes read per token and tok/s per workload, each format
against bf16 at the same budget. Every engine compares its tokens with stock vLLM on the same checkpoint.

    python scripts/measure/quantized_bench.py --work .scratch/quantized --out docs/bench/quantized
    python scripts/measure/quantized_bench.py --out docs/bench/quantized --table-only   # from bench.json

Takes about 30 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

SHARED = Path(__file__).resolve().parents[3] / "shared"
FORMATS = ("bf16", "fp8", "awq")
WORKLOADS = ("decode", "prefill", "batch")


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def make_models(work: Path) -> dict[str, Path]:
    bf16 = work / "tm-x16"
    if not bf16.exists():
        run(["vllm-moe-offload", "pad-model", str(SHARED / "models" / "tiny-mixtral"), str(bf16), "--factor", "16"])
    models = {"bf16": bf16}
    for fmt in FORMATS[1:]:
        models[fmt] = work / f"tm-x16-{fmt}"
        if not models[fmt].exists():
            run(["vllm-moe-offload", "quantize-model", str(bf16), str(models[fmt]), "--format", fmt])
    return models


def bench(models: dict[str, Path], out: Path, args: argparse.Namespace) -> None:
    for fmt, model in models.items():
        run([
            "vllm-moe-offload", "bench", str(model), "--policies", args.policies, "--budgets", args.budgets,
            "--tokens", str(SHARED / "models" / "tiny-mixtral-heldout-tokens.npy"), "--no-drop-cache", "--inprocess",
            "--no-profile", "--decode-tokens", "32", "--prefill-tokens", "128", "--batch", "4",
            "--batch-prompt-tokens", "32", "--batch-new-tokens", "16", "--out", str(out / fmt),
        ])


def _rate(workload: dict) -> float:
    """decode: decode tok/s; prefill: prompt tok/s; batch: generated tok/s (as bench.md reports them)."""
    key = {"decode": "decode_tok_s", "prefill": "prefill_tok_s"}.get(workload["workload"], "throughput_tok_s")
    return workload[key]


def table(out: Path) -> str:
    """Markdown: per workload, budget and format, MiB read per token and tok/s, and ratios to bf16."""
    runs = {}
    for fmt in FORMATS:
        for r in json.loads((out / fmt / "bench.json").read_text())["runs"]:
            runs[fmt, r["name"]] = r
    rows = [
        "| workload | run | format | MiB read/token | x bf16 | loads | tok/s | x bf16 | x stock of the format | tokens = stock |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    names = [name for (fmt, name) in runs if fmt == "bf16" and runs[fmt, name]["kind"] == "offload"]
    for workload in WORKLOADS:
        for name in names:
            base = runs["bf16", name]["workloads"][workload]
            base_mib = _mib_per_token(base)
            for fmt in FORMATS:
                if (fmt, name) not in runs:
                    continue
                w = runs[fmt, name]["workloads"][workload]
                stock = runs[fmt, "stock"]["workloads"][workload]
                mib = _mib_per_token(w)
                rows.append(
                    f"| {workload} | {name} | {fmt} | {mib:.2f} | {_ratio(mib, base_mib)} | {w['offload']['loads']} | "
                    f"{_rate(w):.1f} | {_ratio(_rate(w), _rate(base))} | {_ratio(_rate(w), _rate(stock))} | "
                    f"{'yes' if w.get('tokens_match_stock') else 'NO'} |"
                )
    return "\n".join(rows)


def _mib_per_token(workload: dict) -> float:
    tokens = workload["requests"] * (workload["prompt_tokens"] + workload["generated_tokens"])
    read = workload["offload"]["bytes_read"]
    return (sum(read.values()) if isinstance(read, dict) else read) / 2**20 / tokens


def _ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}" if base else "-"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path(".scratch/quantized"), help="folder for the models")
    parser.add_argument("--out", type=Path, required=True, help="folder for the three bench outputs")
    parser.add_argument("--policies", default="lru", help="bench policies (default %(default)s)")
    parser.add_argument("--budgets", default="25%,50%", help="bench budgets (default %(default)s)")
    parser.add_argument("--table-only", action="store_true", help="print the table from the bench.json in --out")
    args = parser.parse_args()
    if not args.table_only:
        args.work.mkdir(parents=True, exist_ok=True)
        bench(make_models(args.work), args.out, args)
    print(table(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
