"""Figures of the measurement harness. matplotlib is imported inside each function.

Figures are drawn on a ``matplotlib.figure.Figure`` with the Agg canvas, never
through ``pyplot``, so nothing global (backend, open figures) changes.
"""

from __future__ import annotations

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
