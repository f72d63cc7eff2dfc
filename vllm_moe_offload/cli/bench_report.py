"""Tables and files of ``vllm-moe-offload bench``: ``bench.json``, ``bench.md`` and the PNG plots.

Every figure of an offload run is also given as a ratio to stock vLLM and to
``ondemand`` at the same budget (``x1.00`` means equal; for times and bytes
lower is better, for rates higher is better). No vLLM import here.
"""

from __future__ import annotations

import json
from pathlib import Path

MIB = 2**20

#: (label, substring of the cProfile function name) of the MoE layer's host work
_STOCK_PARTS = (
    ("whole MoE layer", "(_moe_forward)"),
    ("router", "fused_moe_router.py"),
    ("experts (stock RoutedExperts)", "routed_experts.py"),
)
_OFFLOAD_PARTS = (
    ("whole MoE layer", "(_moe_forward)"),
    ("router", "fused_moe_router.py"),
    ("offload custom op", "routed_experts>"),
    ("offloaded_forward", "(offloaded_forward)"),
    ("- stock experts kernel inside it", "(_kernel)"),
    ("- torch.unique", "torch._unique2"),
    ("- .tolist()", "'tolist'"),
    ("- ensure (cache lookups)", "(ensure)"),
    ("- remap (ids -> slots)", "(remap)"),
    ("- end_step", "(end_step)"),
)


def write_outputs(report: dict, out: Path) -> list[Path]:
    """Mark token equality, strip token lists, write json, markdown and plots; the paths written."""
    mark_token_equality(report)
    json_path = out / "bench.json"
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    md_path = out / "bench.md"
    md_path.write_text(format_markdown(report))
    from vllm_moe_offload.cli.plots import plot_bench_bound, plot_bench_cache, plot_bench_speed

    paths = [json_path, md_path, plot_bench_speed(report, out / "bench-speed.png"),
             plot_bench_cache(report, out / "bench-cache.png")]
    if report.get("memory_limit_bytes"):
        from vllm_moe_offload.cli.plots import plot_bench_memory

        paths.append(plot_bench_memory(report, out / "bench-memory.png"))
    if any(workload in run.get("bound", {}) for run in report["runs"] for workload in TABLES):
        paths.append(plot_bench_bound(report, out / "bench-bound.png"))
    return paths


def mark_token_equality(report: dict) -> None:
    """Add ``tokens_match_stock`` to every workload (greedy tokens equal to stock's) and drop the tokens.

    Stock's tokens are those of the timed stock run, or where it did not run (killed under
    ``--memory-limit``) those of the stock engine without a limit (``report["reference"]``).
    """
    stock = _stock(report)
    reference = {name: w["tokens"] for name, w in (stock or {}).get("workloads", {}).items() if "tokens" in w}
    for name, tokens in (report.get("reference") or {}).get("tokens", {}).items():
        reference.setdefault(name, tokens)
    for run in report["runs"]:
        for name, w in run["workloads"].items():
            if name in reference and "tokens" in w:
                w["tokens_match_stock"] = w["tokens"] == reference[name]
    for run in report["runs"]:
        for w in run["workloads"].values():
            w.pop("tokens", None)
    (report.get("reference") or {}).pop("tokens", None)


def _stock(report: dict) -> dict | None:
    return next((r for r in report["runs"] if r["kind"] == "stock"), None)


def _ondemand(report: dict, run: dict) -> dict | None:
    if run["kind"] != "offload":
        return None
    return next((r for r in report["runs"] if r["kind"] == "offload" and r["policy"] == "ondemand"
                 and r["budget"] == run["budget"]), None)


# metric name -> (workload, how to read it from a run, format, column title)
def _metric(workload: str, key: str):
    def read(run: dict) -> float | None:
        w = run["workloads"].get(workload, {})
        off = w.get("offload") or {}
        tokens = w.get("prompt_tokens", 0) + w.get("generated_tokens", 0)
        if key == "mib_per_token":
            return off["bytes_read"] / MIB / tokens if off and tokens else None
        if key in ("demand_hit_rate", "ready_rate"):
            return off.get(key)
        if key == "stall_ms_per_token":
            return 1e3 * off["stall_s"] / tokens if off and tokens else None
        if key in ("ttft_ms", "p99_ttft_ms", "tpot_ms"):
            value = w.get(key.replace("_ms", "_s"))
            return None if value is None else 1e3 * value
        return w.get(key)

    return read


TABLES = {
    "decode": ("Batch-1 decode", [
        ("decode tok/s", "decode_tok_s", "{:.1f}"), ("TPOT ms", "tpot_ms", "{:.2f}"),
        ("TTFT ms", "ttft_ms", "{:.1f}"), ("demand hit", "demand_hit_rate", "{:.3f}"),
        ("ready", "ready_rate", "{:.3f}"), ("MiB read/token", "mib_per_token", "{:.2f}"),
        ("stall ms/token", "stall_ms_per_token", "{:.2f}"),
    ]),
    "prefill": ("Prefill", [
        ("prefill tok/s", "prefill_tok_s", "{:.1f}"), ("TTFT ms", "ttft_ms", "{:.1f}"),
        ("demand hit", "demand_hit_rate", "{:.3f}"), ("MiB read/token", "mib_per_token", "{:.2f}"),
        ("stall ms/token", "stall_ms_per_token", "{:.2f}"),
    ]),
    "batch": ("Concurrent requests (offline LLM.generate)", [
        ("generated tok/s", "throughput_tok_s", "{:.1f}"), ("prompt+gen tok/s", "total_tok_s", "{:.1f}"),
        ("mean TTFT ms", "ttft_ms", "{:.0f}"), ("p99 TTFT ms", "p99_ttft_ms", "{:.0f}"),
        ("mean TPOT ms", "tpot_ms", "{:.1f}"),
        ("demand hit", "demand_hit_rate", "{:.3f}"), ("MiB read/token", "mib_per_token", "{:.2f}"),
        ("stall ms/token", "stall_ms_per_token", "{:.2f}"),
    ]),
}


def _cell(value: float | None, fmt: str, stock: float | None, ondemand: float | None) -> str:
    if value is None:
        return "-"
    text = fmt.format(value)
    ratios = [f"x{value / ref:.2f}" if ref else "-" for ref in (stock, ondemand)]
    if ratios != ["-", "-"]:
        text += f" ({ratios[0]} / {ratios[1]})"
    return text


def format_markdown(report: dict) -> str:
    sizes = report["sizes"]
    stock = _stock(report)
    lines = [
        "# vllm-moe-offload bench" + (" (quick smoke test)" if report["quick"] else ""),
        "",
        _describe(report),
        "",
        "Cells of offload runs: value (x ratio to stock / x ratio to ondemand at the same budget). "
        "Times and bytes: lower is better; rates: higher is better. *demand hit*: needed experts the cache held "
        "without this step's prefetch; *ready*: needed experts resident when the layer ran, by cache or prefetch "
        "(equal for policies that do not prefetch). *MiB read/token*: expert "
        "bytes read from the slow tier per token processed (prompt + generated). *stall*: time the MoE op "
        "waited for expert loads.",
        "",
    ]
    workload_text = {
        "decode": f"{sizes['decode_prompt']}-token prompt, {sizes['decode_tokens']} tokens generated, one request",
        "prefill": f"one {sizes['prefill_tokens']}-token prompt, 1 token generated",
        "batch": f"{sizes['batch_requests']} requests of {sizes['batch_prompt']} prompt tokens, "
                 f"{sizes['batch_tokens']} generated each, submitted together",
    }
    lines += _memory_limit_section(report)
    lines += _bound_section(report)
    for workload, (title, columns) in TABLES.items():
        lines += [f"## {title} ({workload_text[workload]})", ""]
        lines.append("| run | " + " | ".join(c[0] for c in columns) + " | tokens = stock |")
        lines.append("|---" * (len(columns) + 2) + "|")
        for run in report["runs"]:
            od = _ondemand(report, run)
            cells = []
            for _, key, fmt in columns:
                read = _metric(workload, key)
                is_ref = run["kind"] == "stock"
                cells.append(_cell(read(run), fmt, None if is_ref else (read(stock) if stock else None),
                                   read(od) if od else None))
            same = run["workloads"].get(workload, {}).get("tokens_match_stock")
            cells.append("-" if run["kind"] == "stock" else {True: "yes", False: "**no**", None: "?"}[same])
            lines.append(f"| {run['name']} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += _memory_table(report)
    lines += _runs_table(report)
    lines += _overhead_section(report)
    return "\n".join(lines) + "\n"


def _bound_section(report: dict) -> list[str]:
    """Per workload and budget: the floors, the bound and every policy's fraction of it."""
    bound = report.get("bound")
    runs = [r for r in report["runs"] if r.get("bound")]
    if not bound or not runs:
        return []
    probes = "; ".join(_bandwidth_text(p) for p in bound["bandwidth"])
    unequal = [name for name, same in bound["routing_tokens_match_stock"].items() if not same]
    lines = [
        "## Fraction of the physical bound", "",
        "*bound* = max(*compute floor*, *I/O floor*) (DESIGN.md section 5): no policy can be faster (but by "
        "noise), a perfect one reaches it. *compute floor*: the all-resident wall time on the workload, taken like "
        f"a run's time (the median): the median of {len(next(iter(bound['stock_wall_s'].values())))} stock timings of it ("
        + _stock_timings_text(report)
        + (f", or of a plugin run holding every expert in a slot ({n} timing(s); their worker runs in the "
           "engine-core process, one process fewer than stock's) where that median is lower"
           if (n := len(next(iter(bound.get("resident_wall_s", {}).values()), []))) else "")
        + "; in brackets the fastest single all-resident timing, which is not the floor: on a shared machine "
        "noise alone would score stock's own median low against it. *I/O floor*: "
        "the expert loads of the optimal cache (Belady's rule, `cli/bench_bound.py`) for the workload's routing "
        "with the run's slots per layer, times the run's bytes per expert, over the disk's read bandwidth: "
        "the faster of a probe that reads the checkpoint the way the runs read (direct I/O, one expert per read) "
        "and the fastest rate the runs' own loads achieved on a workload of 16 loads or more (bytes over the "
        f"I/O threads' read time; a store's file or the host's cache can read faster than the probe): {probes}. "
        "The cache starts warm "
        "with the experts needed first (a run's cache is warm from earlier workloads); a step needing more "
        "experts than slots loads each once, and the prefill's prompt needs each of its experts once per layer. "
        "The routing was recorded by a second stock engine on the same prompts after the timed stock run "
        "(routing is the same for every run: their tokens equal stock's"
        + (f"; **the recording's tokens differ from stock's in {', '.join(unequal)}**" if unequal else "")
        + "). *fraction* = bound / the run's wall time on the workload"
        + ("" if _timings_per_run(report) == 1 else f" (the median of its {_timings_per_run(report)} timings, "
           + ("`--rounds`)" if report.get("repeats", 1) == 1 else "`--rounds` x `--repeats`)"))
        + (f"; in brackets the lowest and highest of its {report['repeats']} engines' own fractions (each from "
           "that engine's median), the spread between starts of the same engine"
           if report.get("repeats", 1) > 1 else "")
        + " (1.00: at the bound; the goal is >= 0.8). "
        "*I/O* or *compute*: the larger floor. *causal floor* (batch-1 decode): the bound lets the prompt's loads "
        "overlap the compute of the tokens after the first, which wait for the prompt's step; no run ends before "
        "max(the optimal cache's loads for the prompt's step alone at the same rate, the all-resident time "
        "to the first token) + the all-resident time of the tokens after it (the lowest median of vLLM's TTFT and "
        "TPOT over the same all-resident engines). Where it is above the bound, a perfect policy scores *best* = "
        "bound / causal floor, not 1.00.", "",
    ]
    policies = report["policies"]
    lines.append("| workload | budget | slots/layer | compute floor ms | I/O floor ms | bound ms | causal floor ms | "
                 + " | ".join(policies) + " |")
    lines.append("|---" * (7 + len(policies)) + "|")
    for workload in TABLES:
        for budget in dict.fromkeys(r["budget"] for r in runs):
            at_budget = {r["policy"]: r for r in runs if r["budget"] == budget and workload in r["bound"]}
            if not at_budget:
                continue
            ref = next(iter(at_budget.values()))
            b = ref["bound"][workload]
            cells = [workload, budget, _slots_text(ref["offload"]["layer_slots"]), _floor_text(b),
                     _ms(b["io_floor_s"]), f"{_ms(b['bound_s'])} ({b['limited_by']})",
                     f"{_ms(b['causal_floor_s'])} (best {b['best_fraction']:.2f})" if "causal_floor_s" in b else "-"]
            for policy in policies:
                run = at_budget.get(policy)
                own = run["bound"][workload] if run else None
                text = "-" if own is None else f"{own['fraction']:.2f}"
                if own is not None and len(own.get("engine_fractions", ())) > 1:
                    text += f" ({min(own['engine_fractions']):.2f}-{max(own['engine_fractions']):.2f})"
                if own is not None and own["io_floor_s"] != b["io_floor_s"]:
                    text += (f" (own slots {_slots_text(run['offload']['layer_slots'])}: I/O floor "
                             f"{_ms(own['io_floor_s'])} ms, bound {_ms(own['bound_s'])} ms)")
                cells.append(text)
            lines.append("| " + " | ".join(cells) + " |")
    skipped = [f"{r['name']} ({r['bound']['skipped']})" for r in runs if "skipped" in r["bound"]]
    if skipped:
        lines += ["", "No bound for: " + "; ".join(skipped) + "."]
    return lines + [""]


def _floor_text(bound: dict) -> str:
    """The compute floor's cell: the floor, and the fastest single all-resident timing where it is kept."""
    fastest = bound.get("fastest_resident_s")
    return _ms(bound["compute_floor_s"]) + (f" ({_ms(fastest)})" if fastest is not None else "")


def _timings_per_run(report: dict) -> int:
    return report.get("rounds", 1) * report.get("repeats", 1)


def _stock_timings_text(report: dict) -> str:
    """Where the compute floor's stock timings come from: the timed engine's, where it finished, and the rounds
    of the engine that recorded the routing (without the bench's memory limit, where there is one)."""
    stock = next((r for r in report["runs"] if r["kind"] == "stock"), {})
    timed = any(w.get("wall_s") is not None for w in stock.get("workloads", {}).values())
    routing = "the rounds of the stock engine that recorded the routing" + (
        ", which ran without the memory limit" if report.get("memory_limit_bytes") else "")
    if timed:
        return f"the timed {_timed_text(report)} and {routing})"
    return f"{routing}; the timed stock engine did not finish)"


def _timed_text(report: dict) -> str:
    """The timed stock engine's timings, in words: one, N rounds, or N engines' M rounds each."""
    rounds, repeats = report.get("rounds", 1), report.get("repeats", 1)
    if repeats > 1:
        return f"{repeats} engines' {rounds} round(s) each"
    return "one" if rounds == 1 else f"engine's {rounds} rounds"


def _bandwidth_text(probe: dict) -> str:
    """One read path's bandwidth for the bound: the rate used, the probe's, and what the runs achieved."""
    measured = (f"probe {probe['gbps']:.2f} GB/s with {probe['io_threads']} I/O thread(s) "
                f"({probe['reads']} reads in {probe['seconds']:.1f} s, {probe['ms_per_read']:.2f} ms each"
                f"{'' if probe['direct_io'] else ', **buffered: O_DIRECT refused**'}; {probe['link']})")
    achieved = probe.get("achieved_gbps")
    if "used_gbps" not in probe:  # a report written before the runs' own rates were counted
        return f"{probe['gbps']:.2f} GB/s ({measured})"
    ran = f"runs' best {achieved:.2f} GB/s ({probe['achieved_by']})" if achieved else "no run read 16 loads"
    return f"**{probe['used_gbps']:.2f} GB/s** ({measured}; {ran})"


def _slots_text(layer_slots: list[int]) -> str:
    return str(layer_slots[0]) if len(set(layer_slots)) == 1 else "/".join(map(str, layer_slots))


def _ms(seconds: float) -> str:
    ms = 1e3 * seconds
    return f"{ms:.0f}" if ms >= 10 else f"{ms:.2f}"


def _describe(report: dict) -> str:
    info = report["model_info"]
    cfg = info["config"]
    pad = info.get("padding")
    model = (f"`{Path(report['model']).name}`: {cfg['num_hidden_layers']} MoE layers x "
             f"{cfg['num_local_experts']} experts (top-{cfg['num_experts_per_tok']}), hidden {cfg['hidden_size']}, "
             f"expert intermediate {cfg['intermediate_size']}")
    if pad:
        model += (f"; a pad-model copy of `{Path(pad['source']).name}` (factor {pad['factor']}: one expert "
                  f"{pad['expert_bytes_after'] / MIB:.2f} MiB, all experts "
                  f"{pad['all_expert_bytes_after'] / MIB:.0f} MiB, same function)")
    m = report["machine"]
    engine = next((r["engine"] for r in report["runs"] if "engine" in r), {})
    return "\n".join([
        f"Model: {model}.",
        f"Link: {report['link']}.",
        f"Engine: vLLM CPU backend, bf16, eager, "
        f"{'multiprocess' if engine.get('multiprocessing') else 'in-process'} engine, "
        f"max_num_batched_tokens {engine.get('max_num_batched_tokens')}, prefix caching "
        f"{engine.get('enable_prefix_caching')}; one engine at a time, each in its own process "
        f"(stock with `VLLM_PLUGINS=moe_offload_amx`: the plugin's AMX permission alone); the page cache is dropped before each run; a 4-token warm-up "
        f"request precedes the workloads, which then run in the order decode, prefill, batch on the same engine.",
        f"Machine: {m['cpus']} CPUs{' (' + m['cpu_model'] + ')' if m.get('cpu_model') else ''}, {m['platform']}; "
        f"{_binding_text(m.get('cpu_binding'))}load average {m['load_avg_at_start'][0]:.2f} at start, "
        f"{m['load_avg_at_end'][0]:.2f} at end. **{m['note']}.**",
        _source_text(m.get("source") or {}),
    ])


def _binding_text(binding: str | None) -> str:
    """vLLM's CPU binding of the run (bench.json's from before 2026-12-07 do not say)."""
    if binding is None:
        return ""
    if binding == "auto":
        return ("vLLM's default CPU binding (`VLLM_CPU_OMP_THREADS_BIND` unset: the worker on one CPU per core, one "
                "kept for the other processes); ")
    return f"`VLLM_CPU_OMP_THREADS_BIND={binding}`; "


def _source_text(source: dict) -> str:
    if not source:
        return "Code: not a git checkout."
    text = f"Code: commit `{source['commit']}`"
    if source["modified"]:
        text += " plus uncommitted changes to " + ", ".join(f"`{p}`" for p in source["modified"])
    return text + "."


def _gib(num_bytes: int | None) -> str:
    return "-" if num_bytes is None else f"{num_bytes / 2**30:.2f}"


def _memory_limit_section(report: dict) -> list[str]:
    """Under ``--memory-limit``: how each engine ended, its peak against the limit, start-up and decode."""
    limit = report.get("memory_limit_bytes")
    if not limit:
        return []
    ref = report.get("reference") or {}
    lines = [
        f"## Under a memory limit of {_gib(limit)} GiB", "",
        "Each engine ran in a memory cgroup of this size (`cli/cgroup.py`), the page cache emptied before it and "
        "counted against the limit, as on a real box. *peak*: the cgroup's peak, every process of the engine "
        "with its page cache. *processes*: peak resident memory (RSS; anonymous part in brackets) of each process "
        "of the engine, sampled every 0.5 s. *major faults*: pages the engine's processes read back from disk, "
        "start-up included (the code each process first runs, since the page cache was emptied; beyond that, what "
        "the kernel reclaimed to stay under the limit and was needed again); *at limit*: how often a charge met "
        "the limit (the kernel then reclaimed page cache). The reference tokens come from "
        + ("the timed stock run." if not ref else f"`{ref.get('name')}`, the stock engine run without a limit "
           f"(in a cgroup that only measures): it peaked at {_gib(ref.get('peak_memory_bytes'))} GiB, started in "
           f"{ref.get('startup_s', 0):.1f} s and decoded {ref.get('decode_tok_s') or 0:.2f} tok/s "
           "(batch-1, while recording the routing)."),
        "",
        "| run | ended | peak GiB | major faults | at limit | start-up s | decode tok/s | expert slots GiB "
        "| processes: peak RSS GiB (anon) |",
        "|---" * 9 + "|",
    ]
    for run in report["runs"]:
        off = run.get("offload") or {}
        decode = run["workloads"].get("decode", {}).get("decode_tok_s")
        procs = "; ".join(f"{_process_kind(p['name'])} {_gib(p.get('VmRSS'))} ({_gib(p.get('RssAnon'))})"
                          for p in run.get("processes", []))
        lines.append(" | ".join([
            f"| {run['name']}", run.get("ended", "?"), _gib(run.get("peak_memory_bytes")),
            str(run.get("major_faults", "-")), str(run.get("limit_hits", "-")),
            f"{run['startup_s']:.1f}" if "startup_s" in run else "-", f"{decode:.2f}" if decode else "-",
            _gib(off.get("slot_bytes")), (procs or "-") + " |",
        ]))
    return lines + [""]


def _process_kind(name: str) -> str:
    """A short name for one of an engine's processes: its ``VLLM::`` title, the front end, or its Python module."""
    if name.startswith("VLLM::"):  # the title overwrites argv in place, so it may end cut or with a ':'
        title = name.split()[0][len("VLLM::"):].rstrip(":")
        return "EngineCore" if title.startswith("EngineCor") else title
    if "bench_run" in name:
        return "front end (LLM)"
    if " -m " in name:  # e.g. vLLM's model inspection, a ``python -m vllm.model_executor.models.registry``
        return name.split(" -m ")[1].split()[0].rsplit(".", 1)[-1]
    if "resource_tracker" in name:
        return "resource_tracker"
    return name.split(":")[0]


def _memory_table(report: dict) -> list[str]:
    lines = [
        "## Memory, disk reads and the page cache", "",
        "*expert slots*: fast memory the plugin allocated for experts (its peak; fixed at start) against the "
        "budget. *experts in page cache*: bytes of the checkpoint's expert tensors resident in the page cache "
        "(`mincore`) after the page cache was dropped, after start-up, and after the workloads. vLLM's loader "
        "reads the non-expert tensors through mmap and the kernel's readahead brings neighbouring expert pages "
        "in at start-up; what proves that the offload reads bypass the page cache is that the residency does "
        "not grow during the workloads while gigabytes of experts are read (O_DIRECT reads always go to the "
        "device, cached or not). *read GB/s*: expert bytes loaded over the time the I/O threads spent reading "
        "them (the read into the slot, with any conversion to the kernel layout), summed over threads: with "
        "one I/O thread (the default) the rate the link gave the loads, with more, each thread's. "
        "*stalled*: the time the MoE op waited for loads as a share of that read time (1.00: no read "
        "overlapped compute). *huge pages*: the model process's anonymous memory in transparent huge pages "
        "after the workloads (the slot pools ask for them; the kernel grants what it finds free, so runs may "
        "differ in them, and with them in the time of reads into the slots and of the kernel over them).",
        "",
        "| run | slots/layer | expert slots MiB | budget MiB | all experts MiB | peak RSS MiB | huge pages MiB "
        "| read from disk MiB | experts in page cache MiB (dropped -> started -> after workloads) | read GB/s "
        "| stalled |",
        "|---" * 11 + "|",
    ]
    for run in report["runs"]:
        if "page_cache_before" not in run:  # did not finish under --memory-limit
            continue
        off = run.get("offload") or {}
        total = run.get("offload_total") or {}
        read = sum(total.get("bytes_read", {}).values()) if total else 0
        before, after = run["page_cache_before"], run["page_cache_after"]
        started = run.get("page_cache_after_start") or {}
        stall, read_s = total.get("stall_s", 0.0), total.get("read_s", 0.0)
        lines.append(" | ".join([
            f"| {run['name']}",
            _slots_text(off["layer_slots"]) if off.get("layer_slots") else str(off.get("slots_per_layer", "all")),
            f"{off['slot_bytes'] / MIB:.1f}" if off else "-",
            f"{off['budget_bytes'] / MIB:.1f}" if off else "-",
            f"{off['num_experts'] * off['expert_bytes'] * total.get('layers', 0) / MIB:.1f}" if off else
            f"{before['expert_bytes'] / MIB:.1f}",
            f"{run['memory_kib'].get('VmHWM', 0) / 1024:.0f}",
            f"{run['memory_kib']['AnonHugePages'] / 1024:.0f}" if "AnonHugePages" in run["memory_kib"] else "-",
            f"{read / MIB:.1f}" if off else "-",
            f"{before['expert_resident_bytes'] / MIB:.1f} -> "
            + (f"{started['expert_resident_bytes'] / MIB:.1f} -> " if started else "? -> ")
            + f"{after['expert_resident_bytes'] / MIB:.1f}",
            f"{read / read_s / 1e9:.2f}" if read and read_s else "-",
            (f"{stall / read_s:.2f}" if read and read_s else "-") + " |",
        ]))
    return lines + [""]


def _runs_table(report: dict) -> list[str]:
    lines = [
        "## Runs", "",
        "*other CPU use*: share of all CPUs other processes kept busy just before the engine started (a run "
        "waits, up to 3 minutes, for it to fall under 15%). *peak RSS*: of the process that holds the model "
        "(start-up included). *read from disk*: every expert read of the run, start-up warm loads included.",
        "",
        "| run | start-up s | other CPU use before start | page cache dropped before start |",
        "|---" * 4 + "|",
    ]
    for run in report["runs"]:
        busy = run.get("background_cpu_busy")
        dropped = "not asked" if "drop_cache_error" not in run else (
            "yes" if run["drop_cache_error"] is None else f"**no** ({run['drop_cache_error']})")
        if "startup_s" not in run:  # did not start under --memory-limit
            lines.append(f"| {run['name']} | - ({run.get('ended')}) | "
                         f"{'-' if busy is None else f'{100 * busy:.0f}%'} | {run.get('page_cache_emptied', '-')} |")
            continue
        lines.append(f"| {run['name']} | {run['startup_s']:.1f} | "
                     f"{'-' if busy is None else f'{100 * busy:.0f}%'} | {dropped} |")
    return lines + [""]


def _overhead_section(report: dict) -> list[str]:
    stock = _stock(report)
    full = next((r for r in report["runs"] if r["kind"] == "full"), None)
    if stock is None or full is None or not stock["workloads"]:
        return []
    lines = ["## Budget 100% against stock (the cost of the offload path when nothing is offloaded)", ""]
    for workload, key, label in (("decode", "tpot_s", "decode TPOT"), ("prefill", "ttft_s", "prefill TTFT"),
                                 ("batch", "wall_s", "batch wall time")):
        s, f = stock["workloads"][workload].get(key), full["workloads"][workload].get(key)
        if s and f:
            lines.append(f"- {label}: stock {1e3 * s:.2f} ms, plugin at 100% {1e3 * f:.2f} ms: "
                         f"{100 * (f / s - 1):+.1f}%")
    layers = (full.get("offload_total") or {}).get("layers")
    s_tpot, f_tpot = stock["workloads"]["decode"].get("tpot_s"), full["workloads"]["decode"].get("tpot_s")
    if layers and s_tpot and f_tpot:
        lines.append(f"- per MoE layer and decode step: {1e6 * (f_tpot - s_tpot) / layers:+.1f} us "
                     f"({layers} MoE layers)")
    if (full.get("profile") or {}).get("moe_functions") and (stock.get("profile") or {}).get("moe_functions"):
        lines += ["", "Where the host time of one MoE layer call goes (cProfile of one batch-1 decode inside the "
                  "engine process; the profiler inflates Python calls, so compare rows, not absolute times):", "",
                  "| run | part | function | calls | us per call |", "|---" * 5 + "|"]
        for run, parts in ((stock, _STOCK_PARTS), (full, _OFFLOAD_PARTS)):
            rows = run["profile"]["moe_functions"]
            for label, needle in parts:
                row = next((r for r in rows if needle in r["function"]), None)
                if row:
                    lines.append(f"| {run['name']} | {label} | `{row['function']}` | {row['ncalls']} | "
                                 f"{1e6 * row['cumtime_s'] / max(row['ncalls'], 1):.1f} |")
    return lines + [""]
