"""Talk to a ``vllm serve`` that offloads experts, with the ``openai`` client; then read its offload metrics.

Start a server first (this script starts nothing), e.g. a tiny random Mixtral
(``vllm-moe-offload`` makes one; its text is noise, its tokenizer has no chat
template, hence ``--chat-template``)::

    python -c "from vllm_moe_offload.cli.tiny_models import make_tiny_model; make_tiny_model('mixtral', '.scratch/demo-mixtral')"
    vllm serve .scratch/demo-mixtral --moe-offload lru --moe-offload-budget 50% \\
        --served-model-name tiny --enforce-eager --max-model-len 512 --kv-cache-memory-bytes 67108864 \\
        --chat-template "{% for m in messages %}{{ m['content'] }}\\n{% endfor %}"

or a real one: ``vllm serve mistralai/Mixtral-8x7B-Instruct-v0.1 --moe-offload fate --moe-offload-budget 12GiB``.
Then::

    python examples/serve_openai_client.py --base-url http://127.0.0.1:8000 --model tiny

It sends a completion, a chat completion and a streamed completion, and prints
the ``vllm:moe_offload_*`` lines of the server's ``/metrics``.
"""

import argparse
import urllib.request

import openai


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server (without /v1)")
    parser.add_argument("--model", default="tiny", help="the served model name")
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()

    client = openai.OpenAI(base_url=args.base_url + "/v1", api_key="unused")
    done = client.completions.create(
        model=args.model, prompt="Once upon a time", max_tokens=args.max_tokens, temperature=0.0,
    )
    print("completion:", repr(done.choices[0].text))

    chat = client.chat.completions.create(
        model=args.model, messages=[{"role": "user", "content": "Hello!"}], max_tokens=args.max_tokens,
        temperature=0.0,
    )
    print("chat:", repr(chat.choices[0].message.content))

    print("stream: ", end="")
    for chunk in client.completions.create(
        model=args.model, prompt="def fibonacci(n):", max_tokens=args.max_tokens, temperature=0.0, stream=True,
    ):
        if chunk.choices:
            print(repr(chunk.choices[0].text), end=" ", flush=True)
    print()

    # the offload counters, next to vLLM's own metrics (refreshed once a second while requests run)
    with urllib.request.urlopen(args.base_url + "/metrics") as resp:
        metrics = resp.read().decode()
    offload = [line for line in metrics.splitlines() if line.startswith("vllm:moe_offload_")]
    print(f"/metrics: {len(offload)} offload samples, e.g.")
    for line in offload:
        if "hits_total" in line or "misses_total" in line or "budget_bytes" in line:
            print("  " + line)


if __name__ == "__main__":
    main()
