"""What budget gives 99% hits? Trace the routing of your workload, then replay it through the cache offline.

    python examples/pick_budget.py MODEL --prompts my_prompts.txt            # trace + simulate
    python examples/pick_budget.py MODEL --trace work/trace.npz --target 0.95 # simulate an existing trace

1. ``vllm-moe-offload trace MODEL --prompts FILE --out trace.npz`` runs the model in
   vLLM and records which experts every token chose in every MoE layer.
2. ``vllm-moe-offload simulate trace.npz --shared --budgets 1,2,...,E --policies lru``
   replays that routing through the expert cache at every slot count per layer
   (no model, no vLLM: seconds), one cache shared by all sequences as in a server.
3. This script reads ``simulate.json`` and prints the smallest budget whose demand
   hit rate reaches ``--target``, as the ``--moe-offload-budget`` share to serve with.

Hit rates depend on the workload: trace prompts like the ones you will serve.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

#: config.json keys holding the number of routed experts, by architecture family
EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")


def num_experts_of(model: Path) -> int:
    config = json.loads((model / "config.json").read_text())
    for key in EXPERT_KEYS:
        if config.get(key):
            return int(config[key])
    raise SystemExit(f"{model}/config.json names no expert count ({', '.join(EXPERT_KEYS)}): not a MoE model?")


def run(*args: str) -> None:
    cmd = [sys.executable, "-m", "vllm_moe_offload.cli.main", *args]
    print("$ vllm-moe-offload", " ".join(args), flush=True)
    subprocess.run(cmd, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="model folder (Mixtral, Qwen-MoE, OLMoE, DeepSeek-V2 format)")
    parser.add_argument("--prompts", help="text file, one prompt per line (needed unless --trace)")
    parser.add_argument("--trace", type=Path, help="an existing trace (.npz): skip tracing")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens generated per prompt when tracing")
    parser.add_argument("--policy", default="lru", help="cache policy to simulate (default lru)")
    parser.add_argument("--target", type=float, default=0.99, help="demand hit rate to reach (default 0.99)")
    parser.add_argument("--work", type=Path, default=Path("pick-budget"), help="output folder")
    args = parser.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    trace = args.trace
    if trace is None:
        if not args.prompts:
            parser.error("--prompts is needed to record a trace (or pass --trace)")
        trace = args.work / "trace.npz"
        run("trace", str(args.model), "--prompts", args.prompts, "--out", str(trace),
            "--max-tokens", str(args.max_tokens), "--ignore-eos")
    experts = num_experts_of(args.model)
    budgets = ",".join(str(n) for n in range(1, experts + 1))
    run("simulate", str(trace), "--shared", "--budgets", budgets, "--policies", args.policy,
        "--out", str(args.work), "--name", "simulate", "--no-progress")

    results = json.loads((args.work / "simulate.json").read_text())["results"]
    print(f"\n{'slots/layer':>11} {'budget':>7} {'hit rate':>9}")
    chosen = None
    for row in results:
        rate = row["policies"][args.policy]["demand_hit_rate"]
        print(f"{row['slots_per_layer']:>11} {row['fraction_of_experts']:>7.1%} {rate:>9.4f}")
        if chosen is None and rate >= args.target:
            chosen = row
    if chosen is None:
        print(f"\nno budget below every expert reaches a {args.target:.0%} hit rate with {args.policy}")
        return
    share = chosen["fraction_of_experts"] * 100
    print(f"\n{args.policy} reaches {args.target:.0%} hits with {chosen['slots_per_layer']}/{experts} experts per "
          f"layer: serve with --moe-offload {args.policy} --moe-offload-budget {share:g}%")


if __name__ == "__main__":
    main()
