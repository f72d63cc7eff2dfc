"""Micro-benchmark (not a test): where batch-1 decode's (or a prefill's) time goes, for each policy.

    python scripts/measure/decode_breakdown.py MODEL --policies "lru[store=kernel],fate[store=kernel]" \\
        --budget 25% [--rounds 3] [--workload prefill --prompt-len 512] [--inprocess] [--json OUT]

Each run starts one engine in its own process, vLLM's default multiprocess engine unless ``--inprocess``,
decodes ``--prompts`` prompts of ``--prompt-len`` held-out tokens for ``--new-tokens`` greedy tokens each
(``--workload prefill``: one token each, prefix caching off, figures per prompt), ``--reps`` times, and splits
the time per generated token (per prompt) into

* *MoE op*: the offloaded layers' custom op, of which *kernel* (the fused-experts calls), *stall* (waits for
  loads) and *plugin* (the rest: routing bookkeeping, predictions, planning, remapping): the layers' own
  counters (``op_s``, ``kernel_s``, ``stall_s`` of ``offload_stats``), so they are read in either engine;
* *rest of model*: everything else in the step (attention, norms, the sampler, the engine's own work, and the
  plugin's hooks outside the op, such as the next-token prefetch at sampling);

and gives the loads and demand misses per token, the kernel calls per token (a prefill's waves), and, in the
one-process engine, the CPU time of the loader threads (``moe-offload-io_*``). The first run is the plugin
holding every expert (``--resident``, lru at 100%: the compute the others are measured against); runs
alternate ``--rounds`` times and each figure is the median over rounds. The bench's physical bound counts a
load as free for the compute; this shows what the loads and the plugin cost besides
(``docs/bench/token-prefetch/README.md``).

Why the multiprocess engine by default: there vLLM's CPU worker computes with one OpenMP thread on core 0 and
leaves core 1 to the other processes, where the one-process engine computes with both cores. On this project's
2-core VM a 512-token prefill of ``tm-x16`` with every expert resident took 42-43 ms in one process and 67-70
ms in the multiprocess engine, and a cProfile of the one-process engine charged waits for the second OpenMP
thread to the plugin's tensor indexing (``docs/bench/multiprocess-breakdown/``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from engine_child import check_args, run_child, short  # this folder's (the script's own directory is on sys.path)

#: held-out tokens of the trained tiny-mixtral beside the repository (../shared), never copied into it
HELDOUT = Path(__file__).resolve().parents[3] / "shared" / "models" / "tiny-mixtral-heldout-tokens.npy"

FIELDS = ("ms_per_token", "moe_op", "kernel", "stall", "plugin", "rest", "loads", "misses", "kernel_calls")


def _thread_cpu_s() -> dict[str, float]:
    """CPU seconds (user + system) of each thread of this process, by Python thread name where it has one."""
    import threading

    tick = os.sysconf("SC_CLK_TCK")
    names = {t.native_id: t.name for t in threading.enumerate()}
    out: dict[str, float] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended
            continue
        name = names.get(int(tid), tid)
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def _child(spec: dict) -> dict:
    """One engine: time the workload and return the figures per generated token, or per prompt for a prefill
    (runs in its own process; the engine core in another unless ``inprocess``)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if spec["inprocess"] else "1"
    import numpy as np
    from vllm import LLM, SamplingParams

    import vllm_moe_offload

    prefill = spec["workload"] == "prefill"
    new_tokens = 1 if prefill else spec["new_tokens"]
    extra = {"additional_config": {"moe_offload": spec["offload"]}} if spec["offload"] else {}
    llm = LLM(spec["model"], dtype="bfloat16", max_model_len=spec["prompt_len"] + new_tokens + 16,
              max_num_seqs=1, kv_cache_memory_bytes=2**26, enforce_eager=True, seed=0,
              enable_prefix_caching=not prefill, **extra)
    tokens = np.load(spec["tokens"]).astype(np.int64).ravel().tolist()
    stride = len(tokens) // spec["prompts"]
    prompts = [{"prompt_token_ids": tokens[i * stride:i * stride + spec["prompt_len"]]} for i in range(spec["prompts"])]
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)  # warm-up

    def totals() -> dict:
        layers = vllm_moe_offload.offload_stats(llm)[0].get("layers", []) if spec["offload"] else []
        return {key: sum(layer[key] for layer in layers)
                for key in ("op_s", "kernel_s", "kernel_calls", "stall_s", "loads", "misses")}

    before, cpu_before = totals(), _thread_cpu_s()
    started = time.perf_counter()
    for _ in range(spec["reps"]):
        for prompt in prompts:
            llm.generate([prompt], params, use_tqdm=False)
    wall_s = time.perf_counter() - started
    after, cpu_after = totals(), _thread_cpu_s()
    spent = {key: after[key] - before[key] for key in after}
    units = spec["reps"] * len(prompts) * (1 if prefill else new_tokens)  # prompts, or generated tokens
    per_unit_ms = 1e3 / units
    io_cpu = sum(cpu_after[name] - cpu_before.get(name, 0.0) for name in cpu_after if name.startswith("moe-offload-io"))
    return {
        "ms_per_token": wall_s * per_unit_ms,
        "moe_op": spent["op_s"] * per_unit_ms,
        "kernel": spent["kernel_s"] * per_unit_ms,
        "stall": spent["stall_s"] * per_unit_ms,
        "plugin": (spent["op_s"] - spent["kernel_s"] - spent["stall_s"]) * per_unit_ms,
        "rest": (wall_s - spent["op_s"]) * per_unit_ms,
        "loads": spent["loads"] / units,
        "misses": spent["misses"] / units,
        "kernel_calls": spent["kernel_calls"] / units,
        # the loader threads live in this process only with the one-process engine
        "io_cpu": io_cpu * per_unit_ms if spec["inprocess"] else None,
    }


def _median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a MoE checkpoint folder (e.g. a pad-model copy of tiny-mixtral)")
    parser.add_argument("--policies", default="lru,fate",
                        help="bench-style entries, NAME or NAME[key=value;...] (default lru,fate)")
    parser.add_argument("--budget", default="25%", help="the offloaded runs' budget (default 25%%)")
    parser.add_argument("--no-resident", dest="resident", action="store_false",
                        help="skip the first run, lru holding every expert (budget 100%%)")
    parser.add_argument("--tokens", type=Path, default=HELDOUT, help="a .npy of token ids the prompts are cut from")
    parser.add_argument("--prompts", type=int, default=3, help="prompts per repetition (default 3)")
    parser.add_argument("--prompt-len", type=int, default=32, help="tokens per prompt (default 32)")
    parser.add_argument("--new-tokens", type=int, default=128, help="greedy tokens per prompt (default 128)")
    parser.add_argument("--reps", type=int, default=2, help="repetitions of the prompts per engine (default 2)")
    parser.add_argument("--rounds", type=int, default=3, help="times each engine is started, alternating (default 3)")
    parser.add_argument("--workload", choices=("decode", "prefill"), default="decode",
                        help="decode (default): figures per generated token; prefill: each prompt generates one "
                             "token, prefix caching off, figures per prompt (give --prompt-len 512)")
    parser.add_argument("--inprocess", action="store_true",
                        help="vLLM's one-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0), which computes with "
                             "every core; default: the multiprocess engine, as deployed; the loader threads' CPU "
                             "time is measured only here")
    parser.add_argument("--json", type=Path, help="also write every round's figures here")
    args = parser.parse_args()
    check_args(args, "decode_breakdown", ("prompts", "prompt_len", "new_tokens", "reps", "rounds"))

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from vllm_moe_offload.cli.bench import policy_settings, split_policies

    runs = [("lru 100%", {"policy": "lru", "budget": "100%"})] if args.resident else []
    try:
        for entry in split_policies(args.policies):
            runs.append((f"{short(entry)} {args.budget}", {**policy_settings(entry), "budget": args.budget}))
    except ValueError as exc:
        raise SystemExit(f"decode_breakdown: {exc}") from None
    common = {"model": str(Path(args.model).resolve()), "tokens": str(args.tokens.resolve()),
              "prompts": args.prompts, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
              "reps": args.reps, "workload": args.workload, "inprocess": args.inprocess}
    results: dict[str, list[dict]] = {name: [] for name, _ in runs}
    total = args.rounds * len(runs)
    for n in range(total):
        name, offload = runs[n % len(runs)]
        print(f"[{n + 1}/{total}] {name} ...", end=" ", flush=True)
        started = time.perf_counter()
        got = run_child("decode_breakdown", {**common, "name": name, "offload": offload})
        results[name].append(got)
        print(f"{got['ms_per_token']:.2f} ms ({time.perf_counter() - started:.0f} s)", flush=True)

    unit = "prompt (one 1-token generation)" if args.workload == "prefill" else "generated token"
    engine = "vLLM's one-process engine" if args.inprocess else "vLLM's multiprocess engine"
    print(f"\nms per {unit}, {engine} (medians of {args.rounds} engines; {args.reps} x {args.prompts} "
          f"{args.workload}s of {args.prompt_len}-token prompts)\n")
    print("| run | total | MoE op | kernel | stall | plugin | rest of model | loads | misses | kernel calls "
          "| loader CPU |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, rounds in results.items():
        med = {key: _median(r[key] for r in rounds) for key in (*FIELDS, "io_cpu")}
        spread = f" ({min(r['ms_per_token'] for r in rounds):.2f}-{max(r['ms_per_token'] for r in rounds):.2f})"
        cells = " | ".join(_cell(med[key]) for key in FIELDS[1:])
        print(f"| {name} | {med['ms_per_token']:.2f}{spread} | {cells} | {_cell(med['io_cpu'])} |")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": results},
                                        indent=1))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
