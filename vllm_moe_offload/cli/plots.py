"""Figures of the measurement harness. matplotlib is imported inside each function.

Figures are drawn on a ``matplotlib.figure.Figure`` with the Agg canvas, never
through ``pyplot``, so nothing global (backend, open figures) changes.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

#: the bound is drawn in black, dashed, so it never reads as one more policy
_BOUND_STYLE = {"color": "black", "linestyle": "--", "marker": "s"}


def plot_hit_rates(report: dict, path: str | Path) -> Path:
    """Hit rate against slots per layer for each policy of a ``simulate`` report.

    Solid lines: demand hit rate; dotted, same colour: ready rate of policies
    with a predictor; dashed black: Belady, the ceiling of the demand hit rate.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    results = report["results"]
    x = [100 * r["fraction_of_experts"] for r in results]
    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name in report["policies"]:
        demand = [r["policies"][name]["demand_hit_rate"] for r in results]
        if name == "belady":
            ax.plot(x, demand, label="belady (optimal demand cache)", **_BOUND_STYLE)
            continue
        (line,) = ax.plot(x, demand, marker="o", label=f"{name} (demand hit)")
        if "+" in name:
            ready = [r["policies"][name]["ready_rate"] for r in results]
            ax.plot(x, ready, linestyle=":", marker="^", color=line.get_color(), label=f"{name} (ready)")
    ax.set_xticks(x, [f"{r['slots_per_layer']}\n{p:.3g}%" for r, p in zip(results, x)])
    ax.set_xlabel(f"cache budget per layer (slots of {report['trace']['num_experts']} experts, % of them)")
    ax.set_ylabel("hit rate (share of needed experts)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    trace = report["trace"]
    ax.set_title(
        f"Expert cache hit rate vs budget: {trace['name']}\n"
        f"{trace['model']}; {report['mode']} caches, {report['order']} order",
        fontsize=10,
    )
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path


def _bench_axes(report: dict, titles: list[str], height: float = 4.0, min_width: float = 4.2):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    runs = report.get("runs", [])
    width = max(min_width, 0.3 * len(runs))  # inches per panel: room for every run's bar and label
    longest = max((len(_label(r["name"])) for r in runs), default=0)
    fig = Figure(figsize=(width * len(titles), height + 0.06 * longest))  # rotated labels below the bars
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(titles), squeeze=False)[0]
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    return fig, axes


def _bench_colors(runs: list[dict]) -> list[str]:
    """Grey for stock, black for the plugin at 100%, one colour per policy (its settings in brackets aside)."""
    palette = {"ondemand": "tab:orange", "lru": "tab:blue", "eap": "tab:purple", "fate": "tab:red",
               "klotski": "tab:green"}
    fixed = {"stock": "0.6", "full": "black"}
    return [fixed.get(r["kind"]) or palette.get((r.get("policy") or "").split("[")[0], "tab:brown") for r in runs]


#: settings of a run's name left out of plot labels: paths say nothing about the run and crowd the axis
_UNLABELLED = ("cache_dir", "profile", "save_profile")


def _label(name: str) -> str:
    """``lru[store=kernel;cache_dir=/x] 25%`` -> ``lru[store=kernel] 25%``."""
    head, sep, rest = name.partition("[")
    if not sep or "]" not in rest:
        return name
    settings, _, tail = rest.partition("]")
    kept = [s for s in settings.split(";") if s.split("=", 1)[0].strip() not in _UNLABELLED]
    return f"{head}[{';'.join(kept)}]{tail}" if kept else f"{head}{tail}"


def _bench_footer(fig, report: dict) -> None:
    model = Path(report["model"]).name
    text = f"vllm-moe-offload bench: {model}; {report['link']}\n{report['machine']['note']}"
    columns = max(40, int(fig.get_figwidth() * 12))  # about what fits the figure's width at 9 points
    lines = [part for line in text.split("\n") for part in textwrap.wrap(line, columns)]
    fig.suptitle("\n".join(lines), fontsize=9)
    fig.tight_layout()


def plot_bench_speed(report: dict, path: str | Path) -> Path:
    """Decode, prefill and batch tok/s of every run of a ``bench`` report (log scale); dashed line: stock."""
    runs = report["runs"]
    panels = [("decode", "decode_tok_s", "batch-1 decode tok/s"), ("prefill", "prefill_tok_s", "prefill tok/s"),
              ("batch", "throughput_tok_s", f"{report['sizes']['batch_requests']} concurrent: generated tok/s")]
    fig, axes = _bench_axes(report, [p[2] for p in panels])
    names = [_label(r["name"]) for r in runs]
    for ax, (workload, key, _) in zip(axes, panels):
        values = [r["workloads"].get(workload, {}).get(key) or 0.0 for r in runs]
        bars = ax.bar(range(len(runs)), values, color=_bench_colors(runs))
        # a run that did not finish under --memory-limit has no bar: its label says how it ended
        ax.bar_label(bars, [r["ended"] if not r["workloads"] and "ended" in r else
                            f"{v:.0f}" if v >= 100 else f"{v:.3g}" for r, v in zip(runs, values)], fontsize=7)
        if any(values):  # none: no run finished this workload (under --memory-limit)
            ax.set_yscale("log")  # offload runs are often 10-100x below stock
            _plain_log_ticks(ax)
        stock = next((v for r, v in zip(runs, values) if r["kind"] == "stock"), None)
        if stock:
            ax.axhline(stock, color="0.4", linestyle="--", linewidth=1)
        ax.set_xticks(range(len(runs)), names, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("tokens / s")
    _bench_footer(fig, report)
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


def plot_bench_cache(report: dict, path: str | Path) -> Path:
    """Demand hit rate and expert MiB read per token of every offload run, per workload."""
    runs = [r for r in report["runs"] if r["kind"] == "offload"]
    workloads = ["decode", "prefill", "batch"]
    fig, axes = _bench_axes(report, ["demand hit rate (share of needed experts cached)",
                                     "expert MiB read from disk per token"])
    width = 0.8 / len(workloads)
    for i, workload in enumerate(workloads):
        hits, mib = [], []
        for r in runs:
            w = r["workloads"].get(workload, {})
            off = w.get("offload") or {}
            tokens = w.get("prompt_tokens", 0) + w.get("generated_tokens", 0)
            hits.append(off.get("demand_hit_rate", 0.0))
            mib.append(off.get("bytes_read", 0) / 2**20 / tokens if tokens else 0.0)
        x = [j + (i - 1) * width for j in range(len(runs))]
        axes[0].bar(x, hits, width, label=workload)
        axes[1].bar(x, mib, width, label=workload)
    for ax in axes:
        ax.set_xticks(range(len(runs)), [_label(r["name"]) for r in runs], rotation=45, ha="right", fontsize=8)
        ax.legend(fontsize=8)
    axes[0].set_ylim(0, 1.02)
    _bench_footer(fig, report)
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


def plot_bench_memory(report: dict, path: str | Path) -> Path:
    """Under ``--memory-limit``: each engine's peak memory (its cgroup's) against the limit, and how it ended."""
    runs = report["runs"]
    limit_gib = report["memory_limit_bytes"] / 2**30
    fig, axes = _bench_axes(report, ["peak memory of each engine's cgroup\n(all its processes, page cache)"],
                            min_width=7.0)
    ax = axes[0]
    values = [r.get("peak_memory_bytes", 0) / 2**30 for r in runs]
    bars = ax.bar(range(len(runs)), values, color=_bench_colors(runs))
    ax.bar_label(bars, [f"{v:.2f}" for v in values], fontsize=7)
    # how a run that did not finish ended: above its bar and clear of the limit's line
    for bar, run in zip(bars, runs):
        if run.get("ended") not in (None, "ran"):
            ax.text(bar.get_x() + bar.get_width() / 2, max(bar.get_height(), limit_gib) * 1.25,
                    "\n".join(textwrap.wrap(run["ended"], 14)), ha="center", va="bottom", fontsize=7)
    ax.axhline(limit_gib, color="black", linestyle="--", linewidth=1, label="memory limit")
    ref = report.get("reference") or {}
    if ref.get("peak_memory_bytes"):
        ax.axhline(ref["peak_memory_bytes"] / 2**30, color="0.6", linestyle=":", linewidth=1,
                   label=f"stock without a limit ({ref['peak_memory_bytes'] / 2**30:.2f} GiB)")
    ax.set_xticks(range(len(runs)), [_label(r["name"]) for r in runs], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("GiB")
    ax.legend(fontsize=8)
    _bench_footer(fig, report)
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


def plot_prefetch_precision(report: dict, path: str | Path) -> Path:
    """Precision (solid) and recall (dotted, same colour) against K per predictor; one panel per batch size.

    ``report`` is a ``core.prefetch_eval.prefetch_sweep`` report.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    results = report["results"]
    batches = list(dict.fromkeys(r["batch"] for r in results))
    predictors = list(dict.fromkeys(r["predictor"] for r in results))
    fig = Figure(figsize=(4.2 * len(batches), 4.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(batches), squeeze=False, sharey=True)[0]
    colors = {"corr": "tab:red", "eap": "tab:blue", "oracle": "black"}
    for ax, batch in zip(axes, batches):
        for name in predictors:
            rows = sorted((r for r in results if r["batch"] == batch and r["predictor"] == name), key=lambda r: r["k"])
            ks = [r["k"] for r in rows]
            style = {"color": colors.get(name)} if name in colors else {}
            (line,) = ax.plot(ks, [r["precision"] for r in rows], marker="o", label=f"{name} precision", **style)
            ax.plot(ks, [r["recall"] for r in rows], linestyle=":", marker="^", color=line.get_color(),
                    label=f"{name} recall")
        ax.set_title(f"batch of {batch} token(s) per step", fontsize=10)
        ax.set_xlabel("K: experts prefetched per layer and step")
        ax.set_xticks(sorted({r["k"] for r in results}))
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("share (precision: of prefetched; recall: of needed)")
    axes[0].legend(fontsize=7, loc="lower left")
    trace = report["trace"]
    fig.suptitle(
        f"Hot-expert prefetch precision and recall vs K: {trace['name']}\n{trace['model']}, "
        f"top-{trace['top_k']} of {trace['num_experts']}; predictors warmed up on the first "
        f"{report['warmup_fraction']:.0%} of the rows, scored on the rest",
        fontsize=9,
    )
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


def plot_bench_bound(report: dict, path: str | Path) -> Path:
    """Each plugin run's wall time per workload (bars, log scale) against its physical bound (dashed black).

    Bars are labelled with the run's fraction of its bound (bound / time); the
    dotted grey line is the compute floor (the all-resident median time: stock's, or the plugin's at 100% where lower).
    """
    workloads = [("decode", "batch-1 decode"), ("prefill", "prefill"),
                 ("batch", f"{report['sizes']['batch_requests']} concurrent requests")]
    runs = [r for r in report["runs"] if any(w in r.get("bound", {}) for w, _ in workloads)]
    fig, axes = _bench_axes({**report, "runs": runs}, [f"{title}: wall time" for _, title in workloads])
    for ax, (workload, _) in zip(axes, workloads):
        bounds = [r["bound"].get(workload) for r in runs]
        x = [i for i, b in enumerate(bounds) if b]
        times = [bounds[i]["time_s"] for i in x]
        bars = ax.bar(x, times, color=[_bench_colors(runs)[i] for i in x])
        ax.bar_label(bars, [f"{bounds[i]['fraction']:.2f}" for i in x], fontsize=7)
        # bench --repeats: whiskers from the fastest to the slowest engine's own median time
        spread = [(i, [bounds[i]["bound_s"] / f for f in bounds[i]["engine_fractions"]]) for i in x
                  if len(bounds[i].get("engine_fractions", ())) > 1]
        if spread:
            # beside the bar's centre, where its label is
            ax.vlines([i + 0.3 for i, _ in spread], [min(t) for _, t in spread], [max(t) for _, t in spread],
                      colors="black", linewidth=1, label="range of the engines' median times (--repeats)")
        ax.hlines([bounds[i]["bound_s"] for i in x], [i - 0.45 for i in x], [i + 0.45 for i in x],
                  colors=_BOUND_STYLE["color"], linestyles=_BOUND_STYLE["linestyle"], linewidth=1.5,
                  label="bound: max(compute, I/O floor)")
        # batch-1 decode: where the prompt's loads outlast its compute, no run beats the causal floor
        causal = [i for i in x if bounds[i].get("causal_floor_s", 0.0) > bounds[i]["bound_s"]]
        if causal:
            ax.hlines([bounds[i]["causal_floor_s"] for i in causal], [i - 0.45 for i in causal],
                      [i + 0.45 for i in causal], colors="tab:red", linestyles="-.", linewidth=1.2,
                      label="causal floor: the prompt's loads, then the tokens after the first")
        if x:
            ax.axhline(bounds[x[0]]["compute_floor_s"], color="0.5", linestyle=":", linewidth=1,
                       label="compute floor (all-resident median)")
        ax.set_yscale("log")  # offload runs are often 10-100x above the bound
        _plain_log_ticks(ax)
        if x:  # headroom above the tallest bar for its label and the legend
            ax.set_ylim(top=5 * max(times + [max(bounds[i]["bound_s"], bounds[i].get("causal_floor_s", 0.0))
                                             for i in x]))
        ax.set_xticks(range(len(runs)), [_label(r["name"]) for r in runs], rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("seconds (bar label: fraction of the bound)")
    axes[0].legend(fontsize=7, loc="upper left")
    _bench_footer(fig, report)
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


def _plain_log_ticks(ax) -> None:
    """Log-axis ticks as plain numbers (0.2, not 2x10^-1); minor ticks labelled at 2 and 5 only."""
    from matplotlib.ticker import FuncFormatter

    def minor(value: float, _) -> str:
        mantissa = round(value / 10 ** math.floor(math.log10(value)), 6)
        return f"{value:g}" if mantissa in (2, 5) else ""

    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(minor))
    ax.tick_params(axis="y", which="minor", labelsize=7)
