"""Generate with a MoE model whose experts are offloaded: only a budget of them stays in memory.

    python examples/offline_generate.py                       # a tiny random MoE made locally
    python examples/offline_generate.py --model ../shared/models/tiny-mixtral --policy lru --budget 25%

Prints the completions and the expert cache's statistics (hits, misses, bytes
read from disk, time the kernel waited for loads).
"""

import argparse
from pathlib import Path

PROMPTS = ["Once upon a time", "The little cat", "def fibonacci(n):"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a local Mixtral/Qwen-MoE/OLMoE/DeepSeek-V2 checkpoint folder "
                        "(default: make a tiny random Mixtral in .scratch/demo-mixtral)")
    parser.add_argument("--policy", default="lru", choices=["ondemand", "lru", "fate", "klotski", "eap"])
    parser.add_argument("--budget", default="50%", help="e.g. 50%%, 2MiB (default 50%%)")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()

    model = args.model
    if model is None:
        from vllm_moe_offload.cli.tiny_models import make_tiny_model

        model = Path(".scratch/demo-mixtral")
        if not (model / "config.json").exists():
            print(f"making a tiny random-weight Mixtral in {model} (its text is noise: the weights are random)")
            make_tiny_model("mixtral", model)

    from vllm import LLM, SamplingParams

    import vllm_moe_offload

    llm = LLM(
        model=str(model), dtype="bfloat16", max_model_len=1024, enforce_eager=True,
        kv_cache_memory_bytes=256 * 2**20,  # skips vLLM's slow automatic KV sizing on CPU
        additional_config={"moe_offload": {"policy": args.policy, "budget": args.budget}},
    )
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=args.max_tokens))
    for prompt, out in zip(PROMPTS, outputs):
        print(f"\n{prompt!r} -> {out.outputs[0].text!r}")
    from vllm_moe_offload.core.stats import format_summary

    for worker in vllm_moe_offload.offload_stats(llm):
        print(f"\nexpert cache ({worker['policy']}, {worker['slots_per_layer']}/{worker['num_experts']} "
              f"experts per layer, {worker['tier']} tier): {format_summary(worker['total'])}")


if __name__ == "__main__":
    main()
