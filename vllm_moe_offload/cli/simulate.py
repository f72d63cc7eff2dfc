"""``vllm-moe-offload simulate``: replay a routing trace through cache policies offline.

Writes ``NAME.json`` (the full report of ``core.simulate.simulate``) and
``NAME.png`` (hit rate against budget) into ``--out``, and prints a table.
With ``--prefetch-sweep K1,K2`` it scores predictors instead (no cache):
``NAME-prefetch.json`` (``core.prefetch_eval.prefetch_sweep``) and
``NAME-prefetch.png`` (precision and recall against K, one panel per ``--batch``).
``--save-profile`` writes the trace's correlation profile (``core.correlation``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vllm_moe_offload.cli.main import Subcommand
from vllm_moe_offload.core.config import Budget, OffloadConfigError, format_bytes
from vllm_moe_offload.core.correlation import CorrelationTable, build_profile_from_trace, load_profile
from vllm_moe_offload.core.predictors import PREDICTOR_NAMES
from vllm_moe_offload.core.schedule import SlotBudget, parse_budgets, replay_length
from vllm_moe_offload.core.simulate import ALL_POLICIES, ORDERS, PolicySpec, resolve_policies, simulate
from vllm_moe_offload.core.traces import Trace, load_trace

DEFAULT_POLICIES = "lru,lfu,ondemand,eap,belady"
DEFAULT_PREDICTORS = "corr,eap,oracle"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("trace", type=Path, help="trace file: .npz (this project's format) or shared/traces .jsonl")
    parser.add_argument(
        "--budgets", default="25%,50%,75%",
        help="slots per layer: counts (2,4,6) or shares of the layer's experts (12.5%%,25%%); default %(default)s",
    )
    parser.add_argument(
        "--policies", default=DEFAULT_POLICIES,
        help="cache policies, optionally CACHE+PREDICTOR (lru+eap, lfu+oracle); eap means lru+eap; "
        f"'all': {', '.join(ALL_POLICIES)}; belady is always added; default %(default)s",
    )
    view = parser.add_mutually_exclusive_group()
    view.add_argument(
        "--per-sequence", dest="mode", action="store_const", const="per-sequence",
        help="one cold cache per sequence, one token per step (batch-1 view; the default)",
    )
    view.add_argument(
        "--shared", dest="mode", action="store_const", const="shared",
        help="one cache over the trace's steps, sequences interleaved",
    )
    parser.set_defaults(mode="per-sequence")
    parser.add_argument(
        "--order", choices=ORDERS, default="sequential",
        help="sequential: experts served one by one, unserved ones evictable (default); step: all pinned",
    )
    parser.add_argument(
        "--prefetch", type=_positive_int, default=None,
        help="experts a predictor prefetches per layer and step (default top_k)",
    )
    parser.add_argument("--expert-bytes", default=None, help="size of one expert, e.g. 336MiB (default: 1 expert unit)")
    parser.add_argument(
        "--batch", default=None, metavar="B[,B...]",
        help="regroup the trace's rows, in step order, into steps of B tokens (implies --shared); "
        "several sizes only with --prefetch-sweep",
    )
    parser.add_argument(
        "--warmup", type=float, default=0.0, metavar="FRACTION",
        help="predictors learn from the first FRACTION of the rows (whole steps); the rest is evaluated (default 0)",
    )
    parser.add_argument("--profile", type=Path, default=None, help="correlation profile the corr predictor starts from")
    parser.add_argument(
        "--save-profile", type=Path, default=None, metavar="PATH",
        help="write the correlation profile built from the whole trace to PATH (.npz)",
    )
    parser.add_argument(
        "--prefetch-sweep", default=None, metavar="K[,K...]",
        help="score --predictors at these prefetch sizes per layer and step instead of replaying caches",
    )
    parser.add_argument(
        "--predictors", default=DEFAULT_PREDICTORS,
        help=f"predictors of --prefetch-sweep, from {', '.join(PREDICTOR_NAMES)} (default %(default)s)",
    )
    parser.add_argument("--out", type=Path, default=Path("out"), help="output folder (default %(default)s)")
    parser.add_argument("--name", default="simulate", help="stem of the output files (default %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    trace = load_trace(args.trace)
    try:
        batches = _int_list(args.batch, "--batch") if args.batch else None
        profile = None if args.profile is None else _load_profile(args.profile, trace)
        if args.prefetch_sweep:
            return _run_sweep(args, trace, batches or [1], profile)
        if batches is not None and len(batches) > 1:
            raise ValueError("several --batch sizes need --prefetch-sweep")
        expert_bytes = _parse_bytes(args.expert_bytes)
        budgets = _feasible(parse_budgets(args.budgets), trace)
        specs = resolve_policies(args.policies.split(","))
    except (ValueError, OffloadConfigError) as exc:
        print(f"vllm-moe-offload simulate: error: {exc}")
        return 2
    if batches is not None:
        args.mode = "shared"
    args.out.mkdir(parents=True, exist_ok=True)
    _save_profile(args, trace)
    report = _simulate_with_progress(trace, budgets, specs, args, expert_bytes, batches[0] if batches else None,
                                     profile)
    from vllm_moe_offload.cli.plots import plot_hit_rates

    _write(report, args.out / args.name, plot_hit_rates, format_report(report))
    return 0


def _write(report: dict, stem: Path, plot, text: str) -> None:
    """``stem``.json and ``stem``.png (drawn by ``plot``), then ``text`` and where they went."""
    json_path = stem.with_name(stem.name + ".json")
    json_path.write_text(compact_json(report) + "\n")
    png_path = plot(report, stem.with_name(stem.name + ".png"))
    print(text)
    print(f"\nwrote {json_path} and {png_path}")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of experts")
    return value


def _parse_bytes(text: str | None) -> int | None:
    if text is None:
        return None
    budget = Budget.parse(text)
    if budget.num_bytes is None:
        raise ValueError(f"--expert-bytes {text!r} must be a size such as 336MiB, not a share")
    return budget.num_bytes


def _feasible(budgets: list[SlotBudget], trace: Trace) -> list[SlotBudget]:
    """Budgets that leave every token its ``top_k`` slots; prints the ones skipped."""
    meta = trace.meta
    kept = []
    for budget in budgets:
        slots = budget.resolve(meta.num_experts)
        if slots < meta.top_k:
            print(f"skipping budget {budget}: {slots} slot(s) per layer, fewer than top_k = {meta.top_k}")
        else:
            kept.append(budget)
    if not kept:
        raise ValueError(f"no budget gives at least top_k = {meta.top_k} slots per layer")
    return kept


def _int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"{option} {text!r} must be comma-separated whole numbers") from None
    if not values or min(values) < 1:
        raise ValueError(f"{option} {text!r} must list numbers >= 1")
    return values


def _load_profile(path: Path, trace: Trace) -> CorrelationTable:
    meta = trace.meta
    return load_profile(path, (trace.num_trace_layers, meta.num_experts, meta.top_k))


def _save_profile(args: argparse.Namespace, trace: Trace) -> None:
    if args.save_profile is not None:
        path = build_profile_from_trace(trace).save(args.save_profile, source=str(args.trace))
        print(f"wrote correlation profile {path}")


def _run_sweep(args: argparse.Namespace, trace: Trace, batches: list[int], profile: CorrelationTable | None) -> int:
    from vllm_moe_offload.core.prefetch_eval import prefetch_sweep

    ks = _int_list(args.prefetch_sweep, "--prefetch-sweep")
    predictors = [p.strip() for p in args.predictors.split(",") if p.strip()]
    unknown = [p for p in predictors if p not in PREDICTOR_NAMES]
    if unknown or not predictors:
        raise ValueError(f"unknown predictors {unknown} in --predictors; allowed: {list(PREDICTOR_NAMES)}")
    report = prefetch_sweep(trace, predictors, ks, batches, warmup=args.warmup, profile=profile)
    args.out.mkdir(parents=True, exist_ok=True)
    _save_profile(args, trace)
    from vllm_moe_offload.cli.plots import plot_prefetch_precision

    _write(report, args.out / f"{args.name}-prefetch", plot_prefetch_precision, format_sweep(report))
    return 0


def format_sweep(report: dict) -> str:
    """One row per batch size, predictor and K: precision and recall over all steps and layers."""
    t = report["trace"]
    lines = [
        f"{t['name']}: {t['model']}, {t['num_tokens']} tokens, {len(t['layer_ids'])} traced layers x "
        f"{t['num_experts']} experts, top-{t['top_k']}; warm-up {report['warmup_fraction']:.0%} of the rows"
        + (", corr starts from a profile" if report["profile"] else ""),
        "precision: predicted experts the step used / predicted; recall: / the step's distinct experts",
        "",
        f"{'batch':>6}  {'predictor':<10}{'K':>4}{'precision':>11}{'recall':>8}{'steps':>7}",
    ]
    for r in report["results"]:
        lines.append(
            f"{r['batch']:>6}  {r['predictor']:<10}{r['k']:>4}{_rate(r['precision']):>11}"
            f"{_rate(r['recall']):>8}{r['steps']:>7}"
        )
    return "\n".join(lines)


def _simulate_with_progress(
    trace: Trace, budgets: list[SlotBudget], specs: list[PolicySpec], args: argparse.Namespace,
    expert_bytes: int | None, batch: int | None = None, profile: CorrelationTable | None = None,
) -> dict:
    from tqdm import tqdm

    steps = -(-trace.num_tokens // batch) if batch else replay_length(trace, args.mode)  # upper bound with --warmup
    total = steps * len(budgets) * len(specs)
    with tqdm(total=total, unit="step", disable=args.no_progress or None, leave=False) as bar:
        return simulate(
            trace, budgets, specs, mode=args.mode, order=args.order, prefetch_n=args.prefetch,
            expert_bytes=expert_bytes, on_step=lambda: bar.update(1), batch=batch, warmup=args.warmup,
            profile=profile,
        )


def format_report(report: dict) -> str:
    """A header and one table row per budget and policy."""
    t = report["trace"]
    unit = report["expert_bytes"] if report["expert_bytes_known"] else None
    lines = [
        f"{t['name']}: {t['model']}, {t['num_tokens']} tokens in {t['num_sequences']} sequence(s), "
        f"{len(t['layer_ids'])} traced layers x {t['num_experts']} experts, top-{t['top_k']}",
        f"mode {report['mode']}, order {report['order']}, predictors prefetch up to "
        f"{report['prefetch_n']} experts per layer and step; "
        + (f"1 expert = {format_bytes(unit)}" if unit else "sizes in experts (no --expert-bytes)")
        + (f"; steps regrouped into {report['batch']} tokens" if report.get("batch") else "")
        + (f"; predictors warmed up on {report['warmup_tokens']} tokens, not replayed"
           if report.get("warmup_tokens") else ""),
        "demand hit: kept by the cache; ready: resident when needed (cache or prefetch); "
        "belady: optimal demand cache; per token: summed over the traced layers",
        "",
        f"{'budget/layer':<16}{'policy':<14}{'demand hit':>11}{'ready':>8}{'misses/token':>14}"
        f"{'loaded/token':>16}{'precision':>11}{'recall':>8}",
    ]
    for entry in report["results"]:
        label = f"{entry['slots_per_layer']} ({entry['fraction_of_experts'] * 100:.1f}%)"
        for name, s in entry["policies"].items():
            per_token = s["loads"] / t["num_tokens"] if t["num_tokens"] else 0.0
            loaded = format_bytes(int(s["bytes_per_token"])) if unit else f"{per_token:.2f} experts"
            lines.append(
                f"{label:<16}{name:<14}{s['demand_hit_rate']:>11.3f}{s['ready_rate']:>8.3f}"
                f"{s['misses'] / max(t['num_tokens'], 1):>14.2f}{loaded:>16}"
                f"{_rate(s['precision']):>11}{_rate(s['recall']):>8}"
            )
            label = ""
    return "\n".join(lines)


def compact_json(value: object, depth: int = 0) -> str:
    """JSON with every innermost object or list on one line (small, and diffs well)."""
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    if not any(isinstance(child, (dict, list)) for child in children):
        return json.dumps(value)
    pad = " " * (depth + 1)
    if isinstance(value, dict):
        items = [f"{pad}{json.dumps(key)}: {compact_json(child, depth + 1)}" for key, child in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * depth + "}"
    items = [pad + compact_json(child, depth + 1) for child in value]
    return "[\n" + ",\n".join(items) + "\n" + " " * depth + "]"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


COMMAND = Subcommand(
    name="simulate",
    help="replay a routing trace through expert-cache policies and predictors (no vLLM needed)",
    add_arguments=add_arguments,
    run=run,
)
