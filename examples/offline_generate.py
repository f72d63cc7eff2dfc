"""Generate with a MoE model whose experts are offloaded: only a budget of them stays in memory.

    python examples/offline_generate.py                  # models/tiny-pymoe, shipped with the project
    python examples/offline_generate.py --policy fate --budget 25%
    python examples/offline_generate.py --model PATH     # another local MoE checkpoint

The default model is a toy MoE trained on Python's standard library (models/tiny-pymoe/README.md),
so the prompts are the starts of Python code. Decodes greedily with a mild repetition penalty
(``--repetition-penalty 1.0``: plain greedy) and prints each prompt and its continuation, then the
expert cache's statistics (hits, misses, bytes read from disk, time the kernel waited for loads).
"""

import argparse
from pathlib import Path

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "models" / "tiny-pymoe"
PROMPTS = [
    'def read_config(path):\n    ',
    'import os\n\n\ndef ',
    'class Parser:\n    """',
    'def read_lines(filename):\n    with open(',
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL),
                        help="a local Mixtral/Qwen-MoE/OLMoE/DeepSeek-V2 checkpoint folder (default: %(default)s)")
    parser.add_argument("--policy", default="lru", choices=["ondemand", "lru", "fate", "klotski", "eap"])
    parser.add_argument("--budget", default="50%", help="e.g. 50%%, 2MiB (default 50%%)")
    parser.add_argument("--max-tokens", type=int, default=48)
    # a toy model decoding greedily soon loops ("path, path, path"); 1.2 keeps it off loops, 1.0 is plain greedy
    parser.add_argument("--repetition-penalty", type=float, default=1.2, help="(default %(default)s)")
    args = parser.parse_args()

    from vllm import LLM, SamplingParams

    import vllm_moe_offload

    llm = LLM(
        model=args.model, dtype="bfloat16", max_model_len=1024, enforce_eager=True,
        kv_cache_memory_bytes=256 * 2**20,  # skips vLLM's slow automatic KV sizing on CPU
        additional_config={"moe_offload": {"policy": args.policy, "budget": args.budget}},
    )
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, repetition_penalty=args.repetition_penalty)
    outputs = llm.generate(PROMPTS, params)
    for i, (prompt, out) in enumerate(zip(PROMPTS, outputs), 1):
        print(f"\n----- prompt {i} -----\n{prompt}\n----- continuation ({len(out.outputs[0].token_ids)} tokens) -----")
        print(out.outputs[0].text)
    from vllm_moe_offload.core.stats import format_summary

    for worker in vllm_moe_offload.offload_stats(llm):
        print(f"\nexpert cache ({worker['policy']}, {worker['slots_per_layer']}/{worker['num_experts']} "
              f"experts per layer, {worker['tier']} tier): {format_summary(worker['total'])}")


if __name__ == "__main__":
    main()
