"""`vllm serve` with offload inside a memory limit smaller than the model, asked over HTTP, against stock vLLM.

Usage (from the repository root, in .venv, as root: it makes a memory cgroup and drops the page cache):
    python scripts/measure/serve_under_limit.py MODEL [--memory-limit 4.5GiB] [--threads 2]
        [--flags "--moe-offload fate --moe-offload-store kernel"] [--out .scratch/serve-under-limit]

MODEL: a pad-model copy whose experts do not fit the limit (e.g. /work/scratch-mem/pymoe-x2048 from
``scripts/measure/vs_llama_cpp.py``). The page cache is dropped, then ``vllm serve MODEL --flags`` (budget
``auto``: the plugin's default) starts inside a memory cgroup of the limit together with a small shell client
that waits for ``/health``, sends the bench's batch-1 decode prompt (its token ids) to ``/v1/completions``
with ``curl`` (greedy, 32 tokens) and stops the server. Then stock vLLM without a limit
(``VLLM_PLUGINS=moe_offload_amx``: the plugin's AMX permission alone), in this process, generates from the
same ids. Prints and writes OUT/serve_under_limit.json: how the server ended, the cgroup's peak, each
process's peak RSS, the server's start-up (to a healthy ``/health``), the request's time, both texts and
whether they are equal. Never run in CI (minutes, gigabytes).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

NEW_TOKENS = 32

#: the shell inside the cgroup: server in the background, the client's request, then the server stopped
CLIENT = """
set -u
{serve} > {log} 2>&1 &
server=$!
started=$(date +%s.%N)
until curl -sf http://127.0.0.1:{port}/health > /dev/null; do
  if ! kill -0 $server 2> /dev/null; then echo "server exited" > {out}/error.txt; exit 3; fi
  sleep 0.5
done
healthy=$(date +%s.%N)
curl -sf http://127.0.0.1:{port}/v1/completions -H 'Content-Type: application/json' -d @{request} -o {out}/response.json
code=$?
done_=$(date +%s.%N)
echo "{{\\"startup_s\\": $(echo "$healthy - $started" | bc), \\"request_s\\": $(echo "$done_ - $healthy" | bc), \\"curl_exit\\": $code}}" > {out}/times.json
kill -TERM $server
wait $server
exit $code
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--memory-limit", default="4.5GiB", help="the cgroup's limit (default %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="compute threads (default %(default)s)")
    parser.add_argument("--flags", default="--moe-offload fate --moe-offload-store kernel",
                        help="offload flags of vllm serve (default %(default)s)")
    parser.add_argument("--out", type=Path, default=REPO / ".scratch" / "serve-under-limit")
    parser.add_argument("--timeout-s", type=float, default=1800)
    args = parser.parse_args()

    from vllm_moe_offload.cli.bench import FULL, make_prompts, parse_memory_limit
    from vllm_moe_offload.cli.cgroup import evict_page_cache, run_limited

    try:
        limit = parse_memory_limit(args.memory_limit)
    except ValueError as exc:
        raise SystemExit(f"serve_under_limit: {exc}") from None
    model = args.model.resolve()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("response.json", "times.json", "error.txt"):
        (out / stale).unlink(missing_ok=True)
    ids = make_prompts(model / "heldout-tokens.npy", str(model), dict(FULL))["decode"][0]
    request = {"model": str(model), "prompt": ids, "max_tokens": NEW_TOKENS, "temperature": 0.0, "ignore_eos": True}
    (out / "request.json").write_text(json.dumps(request))
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve = (f"vllm serve {shlex.quote(str(model))} --port {port} --dtype bfloat16 --enforce-eager "
             f"--max-model-len {len(ids) + NEW_TOKENS} --max-num-seqs 1 {args.flags}")
    env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND=f"0-{args.threads - 1}")
    env.pop("VLLM_PLUGINS", None)
    print(f"+ {serve}  (in a {args.memory_limit} cgroup; page cache: {evict_page_cache([model])})", flush=True)
    script = CLIENT.format(serve=serve, log=out / "serve.log", port=port, out=out, request=out / "request.json")
    run = run_limited(["bash", "-c", script], limit, timeout_s=args.timeout_s, env=env)
    times = json.loads((out / "times.json").read_text()) if (out / "times.json").exists() else {}
    response = json.loads((out / "response.json").read_text()) if (out / "response.json").exists() else None
    served = response["choices"][0]["text"] if response else None

    print("stock vLLM without a limit, in this process, for the reference text", flush=True)
    os.environ.update(VLLM_PLUGINS="moe_offload_amx", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    from vllm import LLM, SamplingParams

    llm = LLM(str(model), dtype="bfloat16", enforce_eager=True, max_model_len=len(ids) + NEW_TOKENS,
              max_num_seqs=1, kv_cache_memory_bytes=2**28, seed=0)
    stock = llm.generate([{"prompt_token_ids": ids}], SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS,
                                                                    ignore_eos=True), use_tqdm=False)[0].outputs[0].text
    report = {
        "model": str(model), "memory_limit_bytes": limit, "flags": args.flags, "threads": args.threads,
        "ended": run.ended, "client_exit_code": run.exit_code,
        "peak_memory_bytes": run.peak_bytes,
        # the client's own sleeps and curls hold nothing worth listing
        "processes": [p for p in run.processes if p.get("VmRSS", 0) >= 64 * 2**20], **times,
        "served_text": served, "stock_text": stock, "texts_equal": served == stock,
        "error": (out / "error.txt").read_text().strip() if (out / "error.txt").exists() else None,
    }
    (out / "serve_under_limit.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "processes"}, indent=1))


if __name__ == "__main__":
    main()
