"""``vllm-moe-offload bench``: real vLLM engines, stock against offload policies and budgets.

Engines run one after another, never two at once, each in its own process
(``cli/bench_run.py``; stock vLLM with ``VLLM_PLUGINS=moe_offload_amx``, the plugin's AMX permission alone): stock with every
expert resident, the plugin at budget 100%, then every policy at every budget.
Each measures a batch-1 decode, one long prefill and a batch of concurrent
requests (see ``--help``). After the timed stock engine, a second stock engine
in the same process records the routing of the same prompts, from which every
run's physical bound and its fraction of it are computed (``cli/bench_bound.py``).
Writes ``bench.json`` (everything), ``bench.md`` (tables, every figure also as
a ratio to stock and to ondemand at the same budget) and PNG plots into
``--out``; report text lives in ``cli/bench_report.py``.

With ``--memory-limit SIZE`` every engine runs in a memory cgroup of that size
(``cli/cgroup.py``; the page cache counts, and is emptied before each engine),
each plugin run in a process of its own, and the bench records how each ended
(ran, OOM-killed, exit code), the cgroup's peak and the peak resident memory of
each of the engine's processes. The engine that records the routing then runs
without a limit (in a cgroup that only measures) and its tokens are the
reference. The plugin at budget 100% is left out: its experts do not fit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vllm_moe_offload.cli.main import Subcommand
from vllm_moe_offload.runtime.amx import STOCK_VLLM_PLUGINS

#: workload sizes in tokens and requests; --quick shrinks them to a smoke test
FULL = {"decode_prompt": 32, "decode_tokens": 128, "prefill_tokens": 512,
        "batch_requests": 32, "batch_prompt": 64, "batch_tokens": 64}
QUICK = {"decode_prompt": 8, "decode_tokens": 8, "prefill_tokens": 32,
         "batch_requests": 4, "batch_prompt": 8, "batch_tokens": 4}

#: the KV cache of stock engines where --kv-cache-bytes is not given: vLLM's CPU default would ask for
#: gpu_memory_utilization of all the machine's memory (and be killed under --memory-limit)
STOCK_KV_CACHE_BYTES = 256 * 2**20

#: rounds of the workloads on the engine that records the routing: with the timed stock run, samples of
#: stock's time whose fastest is the compute floor (one slow moment of a shared machine must not raise it)
ROUTING_ROUNDS = 5

#: a timed engine waits while other processes keep more than this share of all CPUs busy
BUSY_SHARE = 0.15


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="model folder (a Mixtral-format MoE; see pad-model for a benchmark copy)")
    parser.add_argument("--policies", default="ondemand,lru",
                        help="offload policies (default %(default)s); a policy may carry settings in brackets, "
                        "e.g. 'klotski[klotski_features=hot+reorder;klotski_max_group=2]' ('+' separates list "
                        "items), for ablations")
    parser.add_argument("--budgets", default="25%,50%", help="expert budgets, shares or sizes (default %(default)s)")
    parser.add_argument("--tier", default=None, help="slow tier for every offload run (default: auto)")
    parser.add_argument("--io-threads", type=int, default=None, help="expert-loading threads (default 1)")
    parser.add_argument("--link-gbps", type=float, default=None,
                        help="EMULATED link bandwidth for expert transfers, GB/s (reports are labelled)")
    parser.add_argument("--link-latency-ms", type=float, default=None, help="EMULATED latency per transfer, ms")
    parser.add_argument("--tokens", type=Path, default=None,
                        help="a .npy of token ids the prompts are cut from (default: random ids, seed 0)")
    parser.add_argument("--decode-tokens", type=int, default=None, help="tokens of the batch-1 decode (default 128)")
    parser.add_argument("--prefill-tokens", type=int, default=None, help="prompt of the prefill run (default 512)")
    parser.add_argument("--batch", type=int, default=None, help="concurrent requests (default 32)")
    parser.add_argument("--batch-prompt-tokens", type=int, default=None,
                        help="prompt of each concurrent request (default 64)")
    parser.add_argument("--batch-new-tokens", type=int, default=None,
                        help="tokens each concurrent request generates (default 64)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: tiny workloads, every offload run in one process, no profile")
    parser.add_argument("--no-drop-cache", action="store_true",
                        help="do not drop the page cache before each run (dropping needs root)")
    parser.add_argument("--no-profile", action="store_true",
                        help="skip the cProfile decode of stock and budget 100%% (where the overhead goes)")
    parser.add_argument("--inprocess", action="store_true",
                        help="run the engine core in the benchmark's process (VLLM_ENABLE_V1_MULTIPROCESSING=0: "
                        "starts in 2 s instead of 25 s, but the model then shares its process and cores with the "
                        "front end); default: vLLM's multiprocess engine, as deployed; --quick implies it")
    parser.add_argument("--kv-cache-bytes", type=int, default=None,
                        help="KV cache bytes of every engine (default: stock engines 256 MiB, since vLLM's CPU "
                        "backend would otherwise ask for most of the machine's memory; plugin engines as the "
                        "plugin sizes it: every sequence at full length, within a share of the memory)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--rebuild", action="store_true",
                        help="start no engine: rewrite bench.md and the plots from the bench.json in --out")
    parser.add_argument("--timeout-s", type=int, default=1200, help="limit per engine process (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=1, metavar="N",
                        help="time every workload N times on each engine (the prompts' prefix cache reset before "
                        "each repeat): the fraction of the bound takes each run's median time, the compute floor "
                        "every all-resident timing (default %(default)s; the tables show the first timing)")
    parser.add_argument("--repeats", type=int, default=1, metavar="N",
                        help="start every timed engine N times, interleaved (each engine once, then each again), so "
                        "that a slow spell of a shared machine falls on different engines: a run's fraction of the "
                        "bound takes the median of all its timings, and the fraction table shows the range of its "
                        "engines' own fractions (default %(default)s; the other tables show the first engine)")
    parser.add_argument("--memory-limit", default=None, metavar="SIZE",
                        help="run every engine, stock included, in a memory cgroup of SIZE (e.g. 4.5GiB; page cache "
                        "counted; needs root or a delegated cgroup tree) and record how it ended and its peak memory")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from vllm_moe_offload.cli.bench_bound import PROBE_S, QUICK_PROBE_S, add_bounds
    from vllm_moe_offload.cli.bench_report import write_outputs

    if args.rebuild:
        report = json.loads((args.out / "bench.json").read_text())
        print("wrote " + ", ".join(str(p) for p in write_outputs(report, args.out)))
        return 0
    policies = split_policies(args.policies)
    budgets = [b.strip() for b in args.budgets.split(",") if b.strip()]
    sizes = dict(QUICK if args.quick else FULL)
    for key, value in (("decode_tokens", args.decode_tokens), ("prefill_tokens", args.prefill_tokens),
                       ("batch_requests", args.batch), ("batch_prompt", args.batch_prompt_tokens),
                       ("batch_tokens", args.batch_new_tokens)):
        if value:
            sizes[key] = value
    try:
        args.memory_limit_bytes = parse_memory_limit(args.memory_limit)
        _check_settings(args, policies, budgets)
        prompts = make_prompts(args.tokens, args.model, sizes)
    except (ValueError, OSError) as exc:
        print(f"vllm-moe-offload bench: error: {exc}")
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.log").write_text("")
    jobs = plan_jobs(args, policies, budgets, prompts, sizes)
    stock_jobs = [j for j in jobs if j["offload"] is None]  # the timed stock engine, then the routing one
    plugin_jobs = [j for j in jobs if j["offload"] is not None]
    if args.memory_limit_bytes:  # one engine per cgroup, so that each has its own peak and ending
        groups = [[job] for job in stock_jobs + plugin_jobs]
    else:  # --quick: timing does not matter, every plugin engine in one process
        groups = [stock_jobs] + ([plugin_jobs] if args.quick else [[job] for job in plugin_jobs])
    machine = machine_info()
    # the routing engine records once; every timed engine starts again in each repeat, in the same order
    again = [kept for group in groups if (kept := [job for job in group if job["kind"] != "routing"])]
    results = []
    for group in tqdm(groups + again * (args.repeats - 1), desc="engines", unit="process"):
        results += run_group(group, args, stock=group[0]["offload"] is None)
    results = merge_repeats(results)
    routing = next(r for r in results if r["kind"] == "routing")
    if "workloads" not in routing:
        print(f"vllm-moe-offload bench: error: the stock engine without a limit {routing['ended']}; "
              f"see {args.out / 'bench.log'}")
        return 1
    results = [r for r in results if r["kind"] != "routing"]
    report = build_report(args, sizes, machine, results, policies, budgets)
    report["memory_limit_bytes"] = args.memory_limit_bytes
    if args.memory_limit_bytes:
        report["reference"] = _reference(routing)
    report["bound"] = add_bounds(results, routing, lambda run: _run_config(args, run), args.model,
                                 QUICK_PROBE_S if args.quick else PROBE_S)
    paths = write_outputs(report, args.out)
    print((args.out / "bench.md").read_text())
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


#: below this no vLLM engine starts: its processes hold about 2 GiB before the first expert on this backend
MIN_MEMORY_LIMIT_BYTES = 512 * 2**20


def parse_memory_limit(text: str | None) -> int | None:
    """``--memory-limit``: bytes (None when not given); ValueError where it is no size or no cgroup can be made."""
    from vllm_moe_offload.cli.cgroup import MemoryCgroup
    from vllm_moe_offload.core.config import Budget, OffloadConfigError

    if text is None:
        return None
    try:
        num_bytes = Budget.parse(text).num_bytes
    except OffloadConfigError:
        num_bytes = None
    if num_bytes is None:
        raise ValueError(f"--memory-limit {text!r} is not a size; write one such as 4.5GiB, 6000MiB or 6GB")
    if num_bytes < MIN_MEMORY_LIMIT_BYTES:
        raise ValueError(f"--memory-limit {text!r} is below {MIN_MEMORY_LIMIT_BYTES // 2**20} MiB, "
                         "where no vLLM engine starts")
    probe = MemoryCgroup.make(num_bytes)
    if probe is None:
        raise ValueError(f"--memory-limit needs a memory cgroup, and {MemoryCgroup.CANNOT}")
    probe.remove()
    return num_bytes


def _reference(routing: dict) -> dict:
    """What the report keeps of the engine without a limit that recorded the routing (the reference tokens)."""
    keep = ("name", "startup_s", "ended", "memory_limit_bytes", "peak_memory_bytes", "processes", "memory_kib")
    return {**{k: routing[k] for k in keep if k in routing},
            "tokens": {name: w["tokens"] for name, w in routing["workloads"].items()},
            "decode_tok_s": routing["workloads"]["decode"].get("decode_tok_s")}


def _check_settings(args: argparse.Namespace, policies: list[str], budgets: list[str]) -> None:
    """Every policy and budget through the plugin's own validation (ValueError with its message)."""
    from vllm_moe_offload.core.config import OffloadConfig

    if not policies or not budgets:
        raise ValueError("--policies and --budgets need at least one entry each")
    if args.rounds < 1:
        raise ValueError(f"--rounds {args.rounds}: give 1 or more timings per workload")
    if args.repeats < 1:
        raise ValueError(f"--repeats {args.repeats}: give 1 or more engine starts per run")
    for policy in policies:
        for budget in budgets:
            if not OffloadConfig.from_dict(_offload(args, policy, budget)).enabled:
                raise ValueError(f"policy {policy!r} does not offload; choose offload policies such as ondemand,lru")


def split_policies(text: str) -> list[str]:
    """``"lru,klotski[a=1;b=x+y]"`` -> ``["lru", "klotski[a=1;b=x+y]"]`` (commas inside brackets are kept)."""
    return [p.strip() for p in re.split(r",(?![^\[]*\])", text) if p.strip()]


def policy_settings(policy: str) -> dict:
    """The ``moe_offload`` settings a bench policy entry stands for: ``klotski[k=v;k=v]`` -> policy and keys."""
    m = re.fullmatch(r"\s*([\w-]+)\s*(?:\[(.*)\])?\s*", policy)
    if not m:
        raise ValueError(f"policy entry {policy!r} is malformed; write NAME or NAME[key=value;key=value]")
    out = {"policy": m.group(1)}
    for item in filter(None, (m.group(2) or "").split(";")):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"policy entry {policy!r}: {item!r} is not key=value")
        out[key.strip()] = value.strip().replace("+", ",")
    return out


def _offload(args: argparse.Namespace, policy: str, budget: str) -> dict:
    out = {**policy_settings(policy), "budget": budget}
    for key in ("tier", "io_threads", "link_gbps", "link_latency_ms"):
        if getattr(args, key) is not None:
            out[key] = getattr(args, key)
    return out


def _run_config(args: argparse.Namespace, run: dict):
    """The validated offload settings a plugin run of this bench ran with."""
    from vllm_moe_offload.core.config import OffloadConfig

    return OffloadConfig.from_dict(_offload(args, run["policy"], run["budget"]))


def make_prompts(tokens: Path | None, model: str, sizes: dict) -> dict:
    """Token-id prompts of every workload, the same for every engine."""
    import numpy as np

    need = sizes["decode_prompt"] + sizes["prefill_tokens"] + sizes["batch_requests"] * sizes["batch_prompt"] + 16
    if tokens is not None:
        stream = np.load(tokens).astype(np.int64).ravel()
        if len(stream) < need:
            raise ValueError(f"{tokens} holds {len(stream)} tokens; the workloads need {need}")
    else:
        vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
        stream = np.random.default_rng(0).integers(3, vocab, size=need)
    stream = stream.tolist()
    pos = 0

    def take(n: int) -> list[int]:
        nonlocal pos
        out, pos = stream[pos:pos + n], pos + n
        return out

    return {
        "warmup": [take(8)],
        "decode": [take(sizes["decode_prompt"])],
        "prefill": [take(sizes["prefill_tokens"])],
        "batch": [take(sizes["batch_prompt"]) for _ in range(sizes["batch_requests"])],
    }


def plan_jobs(args: argparse.Namespace, policies: list[str], budgets: list[str], prompts: dict, sizes: dict) -> list:
    """Stock, stock recording the routing, the plugin at 100%, then every policy at every budget."""
    max_len = max(sizes["decode_prompt"] + sizes["decode_tokens"], sizes["prefill_tokens"] + 1,
                  sizes["batch_prompt"] + sizes["batch_tokens"]) + 16
    # no workload has more requests at once than the batch: vLLM's default (256 on CPU) would only size a
    # KV cache the bench never fills
    engine = {"dtype": "bfloat16", "max_model_len": max_len, "max_num_seqs": max(sizes["batch_requests"], 1),
              "enforce_eager": True, "seed": 0}
    if args.kv_cache_bytes is not None:
        engine["kv_cache_memory_bytes"] = args.kv_cache_bytes
    stock_engine = {**engine, "kv_cache_memory_bytes": args.kv_cache_bytes or STOCK_KV_CACHE_BYTES}
    workloads = {
        "decode": {"prompts": prompts["decode"], "max_tokens": sizes["decode_tokens"]},
        "prefill": {"prompts": prompts["prefill"], "max_tokens": 1},
        "batch": {"prompts": prompts["batch"], "max_tokens": sizes["batch_tokens"]},
    }
    model = Path(args.model).resolve() if Path(args.model).exists() else args.model  # children run elsewhere
    common = {"model": str(model), "engine": engine, "workloads": workloads, "drop_cache": not args.no_drop_cache,
              "warmup": {"prompts": prompts["warmup"], "max_tokens": 4}}
    profile = not (args.quick or args.no_profile)
    limited = bool(getattr(args, "memory_limit_bytes", None))
    rounds = {"rounds": args.rounds} if args.rounds > 1 else {}
    jobs = [{**common, "engine": stock_engine, "name": "stock", "kind": "stock", "offload": None, "profile": profile,
             **rounds},
            {**common, "engine": stock_engine, "name": "stock, no limit (routing)" if limited else "stock (routing)",
             "kind": "routing", "offload": None, "profile": False, "drop_cache": limited, "record_routing": True,
             "rounds": ROUTING_ROUNDS}]
    if not limited:  # under a limit, all experts do not fit: nothing to learn from budget 100%
        jobs.append({**common, "name": f"{policies[0]} 100%", "kind": "full", "policy": policies[0],
                     "budget": "100%", "offload": _offload(args, policies[0], "100%"), "profile": profile,
                     **rounds})
    for budget in budgets:
        for policy in policies:
            jobs.append({**common, "name": f"{policy} {budget}", "kind": "offload", "policy": policy,
                         "budget": budget, "offload": _offload(args, policy, budget), "profile": False,
                         **rounds})
    return jobs


def run_group(jobs: list[dict], args: argparse.Namespace, stock: bool) -> list[dict]:
    """Run ``jobs`` in one fresh process (stock: with the plugin disabled); their results."""
    background = None if args.quick else wait_until_quiet()
    with tempfile.TemporaryDirectory(prefix="moe-bench-") as tmp_name:
        tmp = Path(tmp_name)
        env = dict(os.environ)
        inprocess = args.inprocess or args.quick
        env.update(VLLM_RPC_BASE_PATH=str(tmp / "rpc"), VLLM_CACHE_ROOT=str(tmp / "cache"),
                   VLLM_ENABLE_V1_MULTIPROCESSING="0" if inprocess else "1", TOKENIZERS_PARALLELISM="false")
        if not inprocess:
            # the profiler's start/stop functions travel to the engine process by (cloud)pickle
            env["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
        (tmp / "rpc").mkdir()
        if stock:
            env["VLLM_PLUGINS"] = STOCK_VLLM_PLUGINS
        else:
            env.pop("VLLM_PLUGINS", None)
        (tmp / "jobs.json").write_text(json.dumps(jobs))
        cmd = [sys.executable, "-m", "vllm_moe_offload.cli.bench_run", str(tmp / "jobs.json"), str(tmp / "out.json")]
        with open(args.out / "bench.log", "a") as log:
            log.write(f"\n===== {', '.join(j['name'] for j in jobs)} =====\n")
            log.flush()
            if args.memory_limit_bytes:
                limited = _run_limited(cmd, jobs, args, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp)
            else:
                proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout_s,
                                      cwd=tmp)
                if proc.returncode != 0:
                    raise RuntimeError(f"engine process for {[j['name'] for j in jobs]} failed ({proc.returncode}); "
                                       f"see {args.out / 'bench.log'}")
                limited = None
        if limited is not None and (limited["ended"] != "ran" or not (tmp / "out.json").exists()):
            # what a report needs of an engine that did not finish: how it ended, and its peak
            results = [{"name": j["name"], "kind": j["kind"], "workloads": {}, "offload": None, **limited}
                       for j in jobs]
        else:
            results = json.loads((tmp / "out.json").read_text())
            for result in results:
                result.update(limited or {})
    for job, result in zip(jobs, results):
        result.update(policy=job.get("policy"), budget=job.get("budget"), background_cpu_busy=background)
    return results


def merge_repeats(results: list[dict]) -> list[dict]:
    """One result per job (``--repeats``): its first engine's, each workload's timings joined by those of the
    job's later engines (``round_wall_s``, so that :func:`~vllm_moe_offload.cli.bench_bound.timings` holds them
    all; ``round_ttft_s`` and ``round_tpot_s`` likewise) and kept per engine in start order
    (``engine_wall_s``); ``engines`` counts the starts. Under a memory limit, every engine's ending
    (``engine_endings``) and the highest peak."""
    from vllm_moe_offload.cli.bench_bound import phase_timings, timings

    merged: dict[str, dict] = {}
    for result in results:
        first = merged.setdefault(result["name"], result)
        if first is result:
            continue
        first["engines"] = first.get("engines", 1) + 1
        for name, workload in first["workloads"].items():
            per_engine = workload.setdefault("engine_wall_s", [timings(workload)])
            later = timings(result["workloads"].get(name, {}))
            per_engine.append(later)
            workload.setdefault("round_wall_s", []).extend(later)
            phases = phase_timings(result["workloads"].get(name, {}))  # for the causal floor
            if phases:
                workload.setdefault("round_ttft_s", []).extend(ttft for ttft, _ in phases)
                workload.setdefault("round_tpot_s", []).extend(tpot for _, tpot in phases)
        if "ended" in first:
            first.setdefault("engine_endings", [first["ended"]]).append(result.get("ended"))
            first["peak_memory_bytes"] = max(first.get("peak_memory_bytes") or 0, result.get("peak_memory_bytes") or 0)
    return list(merged.values())


def _run_limited(cmd: list[str], jobs: list[dict], args: argparse.Namespace, **popen) -> dict:
    """Run one engine process in a memory cgroup (the routing engine: no limit, only measured); its ending."""
    from vllm_moe_offload.cli.cgroup import evict_page_cache, run_limited

    routing = jobs[0]["kind"] == "routing"
    evicted = evict_page_cache([Path(j["model"]) for j in jobs if Path(j["model"]).exists()])
    run = run_limited(cmd, None if routing else args.memory_limit_bytes, timeout_s=args.timeout_s, **popen)
    popen["stdout"].write(f"===== {run.ended}; peak {run.peak_bytes / 2**30:.2f} GiB =====\n")
    return {**run.as_dict(), "page_cache_emptied": evicted}


def cpu_busy_share(window_s: float = 2.0) -> float:
    """Share of all CPU time spent busy over ``window_s`` (from ``/proc/stat``; 0.0 where unreadable).

    Sampled while none of our engines runs, so it measures everyone else.
    """
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields) - idle, sum(fields)

    try:
        busy0, total0 = sample()
        time.sleep(window_s)
        busy1, total1 = sample()
    except OSError:
        return 0.0
    return (busy1 - busy0) / max(total1 - total0, 1)


def wait_until_quiet(limit_s: float = 180.0) -> float:
    """Wait (up to ``limit_s``) until other processes keep less than ``BUSY_SHARE`` of the CPUs busy."""
    deadline = time.monotonic() + limit_s
    busy = cpu_busy_share()
    while busy > BUSY_SHARE and time.monotonic() < deadline:
        time.sleep(5)
        busy = cpu_busy_share()
    return busy


def source_info() -> dict:
    """Commit of the plugin's checkout and its uncommitted files (the code every engine ran)."""
    repo = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True,
                              check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                                capture_output=True, text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return {}
    return {"commit": head, "modified": sorted(line[3:] for line in status)}


def cpu_model() -> str:
    """The CPU's model name and whether it has AMX tiles (``/proc/cpuinfo``; '' where there is none): runs on an
    Intel Xeon with AMX and on an AMD EPYC without differ by 2x in prefill, so a figure needs its CPU."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    name = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
    have = set(flags.group(1).split()) if flags else set()
    isa = "AMX" if "amx_tile" in have else "AVX-512" if "avx512f" in have else "AVX2" if "avx2" in have else ""
    return ", ".join(x for x in ((name.group(1).strip() if name else ""), isa) if x)


def machine_info() -> dict:
    return {
        "source": source_info(),
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model(),
        # vLLM's CPU worker binding: unset ("auto") pins the worker's OpenMP threads to one CPU per physical core,
        # less one per worker kept for the other processes (on 2 CPUs: the worker computes on one)
        "cpu_binding": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_avg_at_start": list(os.getloadavg()),
        "note": "figures from a shared development machine (2 cores, no GPU); another developer's work may "
                "have overlapped some runs",
    }


def build_report(args, sizes, machine, results, policies, budgets) -> dict:
    """Everything ``bench.json`` holds."""
    return {
        "model": str(args.model),
        "model_info": _model_info(Path(args.model)),
        "quick": args.quick,
        "rounds": args.rounds,
        "repeats": args.repeats,
        "sizes": sizes,
        "policies": policies,
        "budgets": budgets,
        "link": _link_text(args),
        "machine": {**machine, "load_avg_at_end": list(os.getloadavg())},
        "runs": results,
    }


def _link_text(args) -> str:
    if args.link_gbps is None and not args.link_latency_ms:
        return "none: experts are read from the real disk with direct I/O"
    bw = f"{args.link_gbps:g} GB/s" if args.link_gbps else "unlimited bandwidth"
    return f"EMULATED link: {bw}, {args.link_latency_ms or 0:g} ms latency per transfer"


def _model_info(folder: Path) -> dict:
    info: dict = {}
    for name in ("config.json", "pad_model.json"):
        path = folder / name
        if path.exists():
            info[name] = json.loads(path.read_text())
    cfg = info.get("config.json", {})
    keys = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_local_experts", "num_experts_per_tok")
    return {
        "config": {k: cfg.get(k) for k in keys},
        "padding": info.get("pad_model.json"),
    }


COMMAND = Subcommand(
    name="bench",
    help="benchmark real vLLM engines: stock vs offload policies at several budgets (decode, prefill, batch)",
    add_arguments=add_arguments,
    run=run,
)


if __name__ == "__main__":
    from vllm_moe_offload.cli.main import main

    sys.exit(main(["bench", *sys.argv[1:]]))
