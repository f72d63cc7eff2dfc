"""Bigger than memory, one command: stock vLLM, the plugin and llama.cpp under the same memory limit.

Usage (from the repository root, in .venv, as root: it makes memory cgroups and drops the page cache):
    python scripts/measure/vs_llama_cpp.py [--factor 2048] [--memory-limit 4.5GiB] [--threads 2|default]
        [--work /work/scratch-mem] [--policies POLICIES] [--inprocess-policies POLICIES]

1. Pads the shipped models/tiny-pymoe with ``pad-model --factor F`` into WORK (2048: 96 MiB experts,
   9 GiB of experts in all; same function), unless it is there.
2. Builds llama.cpp (``llama-completion``) from the copy vendored in PyPI's llama-cpp-python source
   package (``pip download --no-binary :all: --no-deps llama-cpp-python==VERSION``), in WORK, unless built.
3. Converts the padded model to a bf16 GGUF with that llama.cpp's own ``convert_hf_to_gguf.py`` (its
   ``gguf-py`` on the path; the tiny tokenizer's pre-tokenizer hash is unknown to the converter and is
   mapped to ``gpt-2``, what the tokenizer is: byte-level BPE), unless converted.
4. Runs ``vllm-moe-offload bench --memory-limit`` on the padded model: stock vLLM and every policy with
   ``--moe-offload-budget auto``, each engine in a memory cgroup of the limit (plus stock without a
   limit for the reference tokens); then again with ``--inprocess`` for ``--inprocess-policies`` (vLLM's
   engine in one process instead of two: what ``LLM(...)`` runs with ``VLLM_ENABLE_V1_MULTIPROCESSING=0``).
5. Runs ``llama-completion`` in a memory cgroup of the same limit (page cache dropped first; llama.cpp
   memory-maps the model, so its page cache is what caches experts) on the bench's batch-1 decode
   prompt (the same token ids, turned to text), greedy, the same number of tokens and threads.
6. Prints one table: how each ended, batch-1 decode tok/s, peak memory, start-up seconds; writes
   WORK/vs_llama_cpp.json. Never run in CI: it takes about half an hour and ~30 GB of disk.

Threads: vLLM's CPU worker is pinned to cores 0..N-1 (``VLLM_CPU_OMP_THREADS_BIND``), llama.cpp gets ``-t N``.
``--threads default`` leaves vLLM's own binding, what ``vllm serve`` and ``LLM(...)`` do when nothing is set (the
worker on one CPU per physical core, less one kept for the front end and the engine core: on 2 CPUs it computes
on one), and gives llama.cpp as many threads as that leaves the worker.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "models" / "tiny-pymoe"
sys.path.insert(0, str(REPO))

#: workload sizes of the bench runs: batch-1 decode is what is compared; prefill and batch are kept small
#: because under the limit every step of them reads gigabytes of experts
BENCH_SIZES = ["--decode-tokens", "32", "--prefill-tokens", "64", "--batch", "4", "--batch-prompt-tokens", "16",
               "--batch-new-tokens", "8"]

#: seconds each engine process may run: the plugin's runs take 1-4 min (a first kernel-store build ~2 more);
#: stock under the limit was OOM-killed after ~2.7 min in most runs but once thrashed, still loading after 9 min,
#: and is then reported as "timed out" instead of holding the bench for an hour
ENGINE_TIMEOUT_S = 900

#: converter wrapper: the tiny tokenizer's pre-tokenizer hash is in no list; it is byte-level BPE like GPT-2's
CONVERT = """
import sys
sys.path[:0] = [{src!r}, {src!r} + "/gguf-py"]
import conversion.base as base
import convert_hf_to_gguf
original = base.TextModel.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    try:
        return original(self, tokenizer)
    except NotImplementedError:
        return "gpt-2"
base.TextModel.get_vocab_base_pre = get_vocab_base_pre
sys.argv = ["convert_hf_to_gguf.py", {model!r}, "--outtype", "bf16", "--outfile", {out!r}]
convert_hf_to_gguf.main()
"""


def run(cmd: list[str], **kw) -> None:
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kw)


def build_llama_cpp(work: Path, version: str, jobs: int) -> tuple[Path, Path]:
    """(llama-completion binary, llama.cpp source folder); built once in WORK."""
    src = work / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    build = work / f"llama.cpp-{version}-build"
    binary = build / "bin" / "llama-completion"
    if binary.exists():
        return binary, src
    if not src.exists():
        run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
             f"llama-cpp-python=={version}", "-d", str(work)])
        with tarfile.open(work / f"llama_cpp_python-{version}.tar.gz") as tar:
            tar.extractall(work, filter="data")
    run(["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_TESTS=OFF",
         "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF",
         "-DGGML_NATIVE=ON"])
    run(["cmake", "--build", str(build), "-j", str(jobs), "--target", "llama-completion"])
    return binary, src


def convert(model: Path, src: Path, out: Path) -> None:
    if out.exists():
        return
    partial = out.with_suffix(".partial")
    run([sys.executable, "-c", CONVERT.format(src=str(src), model=str(model), out=str(partial))])
    partial.rename(out)


def decode_prompt_text(model: Path, tokens_npy: Path) -> tuple[str, list[int]]:
    """The bench's batch-1 decode prompt (``cli/bench.py::make_prompts``), as text and ids."""
    from tokenizers import Tokenizer

    from vllm_moe_offload.cli.bench import FULL, make_prompts

    ids = make_prompts(tokens_npy, str(model), dict(FULL))["decode"][0]
    return Tokenizer.from_file(str(model / "tokenizer.json")).decode(ids), ids


def run_llama(binary: Path, gguf: Path, prompt_file: Path, new_tokens: int, threads: int, limit_bytes: int,
              log: Path) -> dict:
    from vllm_moe_offload.cli.cgroup import evict_page_cache, run_limited

    cmd = [str(binary), "-m", str(gguf), "-f", str(prompt_file), "-n", str(new_tokens), "-t", str(threads),
           "-tb", str(threads), "--temp", "0", "--top-k", "1", "--seed", "0", "--ignore-eos", "-c", "512",
           "-no-cnv", "--no-display-prompt"]
    print("+ " + " ".join(cmd), flush=True)
    emptied = evict_page_cache([gguf])
    with open(log, "w") as f:
        result = run_limited(cmd, limit_bytes, timeout_s=3600, stdout=f, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL)
    text = log.read_text()
    out = {"name": f"llama.cpp (bf16 GGUF, mmap, {threads} threads)", **result.as_dict(), "page_cache_emptied": emptied,
           "command": cmd}
    # llama.cpp's perf lines: "load time = X ms", "prompt eval time = X ms / N tokens",
    # "eval time = X ms / N runs (... ms per token, Y tokens per second)"
    if m := re.search(r"load time =\s*([\d.]+) ms", text):
        out["startup_s"] = float(m.group(1)) / 1e3
    if m := re.search(r"prompt eval time =\s*([\d.]+) ms /\s*(\d+) tokens", text):
        out["prompt_eval_s"], out["prompt_tokens"] = float(m.group(1)) / 1e3, int(m.group(2))
    if m := re.search(r"\s eval time =\s*([\d.]+) ms /\s*(\d+) runs.*?([\d.]+) tokens per second", text):
        out["decode_s"], out["decode_runs"], out["decode_tok_s"] = float(m.group(1)) / 1e3, int(m.group(2)), \
            float(m.group(3))
    return out


def vllm_default_threads() -> int:
    """The CPUs vLLM's default binding gives a lone CPU worker on x86 (``vllm/utils/ompmultiprocessing.py``): one per
    physical core of the first NUMA node the process may use, less one for the other processes where that leaves
    any."""
    from vllm.utils import cpu_resource_utils as cr

    node = cr.get_visible_memory_node()[0]
    cores = len({cpu.physical_core for cpu in cr.get_allowed_cpu_list() if cpu.numa_node == node})
    return cores - 1 if cores > 1 else cores


def parse_threads(text: str) -> int | None:
    """``--threads``: a count, or None for vLLM's default binding."""
    if text == "default":
        return None
    try:
        threads = int(text)
    except ValueError:
        threads = 0
    if threads < 1 or threads > (os.cpu_count() or 1):
        raise argparse.ArgumentTypeError(f"{text!r}: give a thread count from 1 to {os.cpu_count()} (the CPUs "
                                         "here), or 'default' for vLLM's own binding")
    return threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--factor", type=int, default=2048, help="pad-model factor for tiny-pymoe (default 2048)")
    parser.add_argument("--model", type=Path, default=None, help="an already padded model (default: WORK/pymoe-xF)")
    parser.add_argument("--memory-limit", default="4.5GiB", help="memory limit of every engine (default 4.5GiB)")
    parser.add_argument("--threads", type=parse_threads, default=2,
                        help="compute threads of every engine, vLLM's worker pinned to CPUs 0..N-1 (default 2); "
                             "'default': vLLM's own binding, llama.cpp as many threads as it gives the worker")
    parser.add_argument("--policies", default="lru,fate,lru[store=kernel],fate[store=kernel],"
                        "lru[replacement=nextuse;store=kernel]",
                        help="bench --policies, each run with budget auto (default %(default)s)")
    parser.add_argument("--work", type=Path, default=REPO / ".scratch" / "vs-llama-cpp",
                        help="padded model, llama.cpp build, GGUF, stores and results (default %(default)s)")
    parser.add_argument("--llama-cpp-python", default="0.3.36", help="llama-cpp-python sdist version (%(default)s)")
    parser.add_argument("--inprocess-policies", default="lru[store=kernel],lru[replacement=nextuse;store=kernel]",
                        help="policies also run with vLLM's in-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0: "
                             "one process instead of two, so auto finds more memory for the experts); '' for none "
                             "(default %(default)s)")
    parser.add_argument("--skip-bench", action="store_true",
                        help="reuse WORK/bench/bench.json and WORK/bench-inprocess/bench.json (llama.cpp only)")
    args = parser.parse_args()
    from vllm_moe_offload.cli.bench import parse_memory_limit, split_policies

    try:
        limit = parse_memory_limit(args.memory_limit)
    except ValueError as exc:
        raise SystemExit(f"vs_llama_cpp: {exc}") from None
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    model = (args.model or work / f"pymoe-x{args.factor}").resolve()
    threads = args.threads or vllm_default_threads()
    if not (model / "config.json").exists():
        run([sys.executable, "-m", "vllm_moe_offload.cli.main", "pad-model", str(SHIPPED), str(model),
             "--factor", str(args.factor)])
    binary, src = build_llama_cpp(work, args.llama_cpp_python, os.cpu_count() or 2)
    gguf = work / f"{model.name}-bf16.gguf"
    convert(model, src, gguf)

    bench_out, inprocess_out = work / "bench", work / "bench-inprocess"
    if not args.skip_bench:
        stores = work / "stores"
        env = dict(os.environ)
        env.pop("VLLM_CPU_OMP_THREADS_BIND", None)
        if args.threads is not None:
            env["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{args.threads - 1}"
        for out, spec, extra in ((bench_out, args.policies, []), (inprocess_out, args.inprocess_policies,
                                                                   ["--inprocess"])):
            if not spec:
                continue
            policies = ",".join(p if "store=" not in p else p.replace("]", f";cache_dir={stores}]")
                                for p in split_policies(spec))
            run([sys.executable, "-m", "vllm_moe_offload.cli.main", "bench", str(model), "--memory-limit",
                 args.memory_limit, "--policies", policies, "--budgets", "auto", "--tokens",
                 str(model / "heldout-tokens.npy"), *BENCH_SIZES, "--no-profile", "--timeout-s", str(ENGINE_TIMEOUT_S),
                 *extra, "--out", str(out)], env=env)
    report = json.loads((bench_out / "bench.json").read_text())
    inprocess = (json.loads((inprocess_out / "bench.json").read_text())
                 if args.inprocess_policies and (inprocess_out / "bench.json").exists() else None)
    # how the vLLM rows ran: the bench records it (a reused bench.json may come from another --threads)
    recorded = report["machine"].get("cpu_binding")
    binding = ("vLLM's binding not recorded" if recorded is None else "vLLM's default binding" if recorded == "auto"
               else f"vLLM's worker pinned to CPUs {recorded}")
    text, ids = decode_prompt_text(model, model / "heldout-tokens.npy")
    prompt_file = work / "decode-prompt.txt"
    prompt_file.write_text(text)
    llama = run_llama(binary, gguf, prompt_file, report["sizes"]["decode_tokens"], threads, limit,
                      work / "llama.log")
    llama["bench_prompt_tokens"] = len(ids)

    rows = []
    for runs, suffix in ((report["runs"], ""), ((inprocess or {}).get("runs", []), ", in-process engine")):
        for run_ in runs:
            decode = run_["workloads"].get("decode", {})
            rows.append({"name": _short(run_["name"]) + suffix, "ended": run_.get("ended"),
                         "decode_tok_s": decode.get("decode_tok_s"), "peak_gib": run_.get("peak_memory_bytes", 0) / 2**30,
                         "startup_s": run_.get("startup_s"), "tokens_match_stock": decode.get("tokens_match_stock")})
    ref = report.get("reference") or {}
    rows.append({"name": "stock, no limit (reference)", "ended": ref.get("ended"),
                 "decode_tok_s": ref.get("decode_tok_s"), "peak_gib": ref.get("peak_memory_bytes", 0) / 2**30,
                 "startup_s": ref.get("startup_s"), "tokens_match_stock": None})
    rows.append({"name": llama["name"], "ended": llama["ended"], "decode_tok_s": llama.get("decode_tok_s"),
                 "peak_gib": llama["peak_memory_bytes"] / 2**30, "startup_s": llama.get("startup_s"),
                 "tokens_match_stock": None})
    pad = json.loads((model / "pad_model.json").read_text())
    summary = {"model": str(model), "all_expert_bytes": pad["all_expert_bytes_after"], "memory_limit_bytes": limit,
               "threads": threads, "vllm_binding": binding, "decode_prompt_tokens": len(ids),
               "decode_tokens": report["sizes"]["decode_tokens"], "rows": rows, "llama_cpp": llama,
               "machine": report["machine"]}
    (work / "vs_llama_cpp.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"\n{model.name}: {pad['all_expert_bytes_after'] / 2**30:.2f} GiB of experts; limit "
          f"{limit / 2**30:.2f} GiB (page cache counted); llama.cpp {threads} thread(s), {binding}; batch-1 decode of "
          f"{summary['decode_tokens']} tokens after a {len(ids)}-token prompt, greedy\n")
    print("| engine | ended | decode tok/s | peak GiB | start-up s | tokens = stock |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        tok = "-" if r["decode_tok_s"] is None else f"{r['decode_tok_s']:.2f}"
        start = "-" if r["startup_s"] is None else f"{r['startup_s']:.1f}"
        same = {True: "yes", False: "no", None: "-"}[r["tokens_match_stock"]]
        print(f"| {r['name']} | {r['ended']} | {tok} | {r['peak_gib']:.2f} | {start} | {same} |")
    print(f"\nllama.cpp start-up: its 'load time'; vLLM's: LLM() construction. llama.cpp's prompt: "
          f"{llama.get('prompt_tokens')} tokens as it tokenized the text of the bench's {len(ids)}. "
          f"Wrote {work / 'vs_llama_cpp.json'}, {bench_out / 'bench.md'}"
          + (f", {inprocess_out / 'bench.md'}" if inprocess is not None else ""))


def _short(name: str) -> str:
    """A run's name without the store's cache folder (``lru[store=kernel;cache_dir=/x] auto`` -> ``lru[store=kernel]
    auto``)."""
    return re.sub(r";?cache_dir=[^;\]]*", "", name).replace("[]", "")


if __name__ == "__main__":
    main()
