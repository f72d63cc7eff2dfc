"""The ``--moe-offload*`` command-line flags and how they fold into ``additional_config``.

Plain argparse; no vLLM import. ``patches/engine_args.py`` adds the group to
vLLM's parser and calls :func:`fold_into_additional_config` after parsing.
"""

from __future__ import annotations

import argparse
from typing import Any

from vllm_moe_offload.core.replacement import REPLACEMENT_NAMES
from vllm_moe_offload.core.config import (
    CONFIG_KEY,
    KLOTSKI_FEATURES,
    Budget,
    OffloadConfigError,
    Policy,
    Pool,
    Quant,
    Store,
    Tier,
)

#: argparse dest -> key of additional_config["moe_offload"]
FLAG_KEYS = {
    "moe_offload": "policy",
    "moe_offload_budget": "budget",
    "moe_offload_tier": "tier",
    "moe_offload_direct_io": "direct_io",
    "moe_offload_io_threads": "io_threads",
    "moe_offload_link_gbps": "link_gbps",
    "moe_offload_link_latency_ms": "link_latency_ms",
    "moe_offload_quant": "quant",
    "moe_offload_store": "store",
    "moe_offload_cache_dir": "cache_dir",
    "moe_offload_resident_layers": "resident_layers",
    "moe_offload_overfetch": "overfetch",
    "moe_offload_token_prefetch": "token_prefetch",
    "moe_offload_layer_ahead": "layer_ahead",
    "moe_offload_load_timeout_s": "load_timeout_s",
    "moe_offload_io_stuck_s": "io_stuck_s",
    "moe_offload_replacement": "replacement",
    "moe_offload_pool": "pool",
    "moe_offload_profile": "profile",
    "moe_offload_save_profile": "save_profile",
    "moe_offload_klotski_features": "klotski_features",
    "moe_offload_klotski_max_group": "klotski_max_group",
    "moe_offload_klotski_hold_ms": "klotski_hold_ms",
}

GROUP_TITLE = "MoEOffload"


def _budget(value: str) -> str:
    try:
        Budget.parse(value)
    except OffloadConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def add_flags(parser: argparse.ArgumentParser) -> None:
    """Add the plugin's argument group (shown by ``vllm serve --help=MoEOffload``)."""
    group = parser.add_argument_group(
        title=GROUP_TITLE,
        description="Mixture-of-Experts expert offloading (vllm-moe-offload plugin). "
        "Keeps only a budget of experts in fast memory and loads the rest when needed.",
    )
    group.add_argument(
        "--moe-offload", dest="moe_offload", default=None, choices=[p.value for p in Policy],
        help="Expert offload policy: 'ondemand' (fixed resident set, misses loaded and dropped), "
        "'lru' (least-recently-used cache over the whole budget), 'fate' (cross-layer gate prefetch, "
        "in batch-1 decode also from the sampled token, ARC caches, shallow layers resident), 'klotski' (correlation-table prefetch of the hot experts of "
        "the next layer, sized by an I/O-compute planner; for batches), 'eap' (baseline: each request's "
        "expert activation path matched against finished requests, MoE-Infinity style), or 'off' (stock vLLM; "
        "the default).",
    )
    group.add_argument(
        "--moe-offload-budget", dest="moe_offload_budget", default=None, type=_budget, metavar="SIZE",
        help="Fast memory for expert slots, over all MoE layers: 'auto' (the default: the largest budget "
        "that fits the memory this engine may use, its cgroup's limit or else the system's available memory, "
        "after the non-expert weights, the KV cache and a working margin; CPU backend), a size (4GiB, 512MiB, "
        "1.5GB, or bytes) or a share of the model's expert bytes (50%%).",
    )
    group.add_argument(
        "--moe-offload-tier", dest="moe_offload_tier", default=None, choices=[t.value for t in Tier],
        help="Where experts outside the slots live: 'disk' (the checkpoint's safetensors, direct I/O), "
        "'host' (a host-memory copy), 'auto' (disk on CPU, host on CUDA; the default).",
    )
    group.add_argument(
        "--moe-offload-direct-io", dest="moe_offload_direct_io", default=None,
        action=argparse.BooleanOptionalAction,
        help="Read experts from disk with O_DIRECT, bypassing the page cache (default on; "
        "falls back to buffered reads with a warning where the filesystem refuses it).",
    )
    group.add_argument(
        "--moe-offload-io-threads", dest="moe_offload_io_threads", default=None, type=int, metavar="N",
        help="Threads that read experts from the slow tier (default 1).",
    )
    group.add_argument(
        "--moe-offload-link-gbps", dest="moe_offload_link_gbps", default=None, type=float, metavar="GBPS",
        help="Link emulator for benchmarks: cap expert transfers at this many GB/s (default: off).",
    )
    group.add_argument(
        "--moe-offload-link-latency-ms", dest="moe_offload_link_latency_ms", default=None, type=float,
        metavar="MS", help="Link emulator for benchmarks: add this latency to each expert transfer (ms).",
    )
    group.add_argument(
        "--moe-offload-quant", dest="moe_offload_quant", default=None, choices=[q.value for q in Quant],
        help="Storage format of offloaded experts: 'none' (full precision, the checkpoint itself; the "
        "default), 'int4' (int4 in groups of 64, written once to a store under the cache directory, "
        "dequantized on load), 'int4+int2' (the store also holds int2, groups of 32, for the least-needed "
        "experts). Needs the disk tier ('auto' picks it).",
    )
    group.add_argument(
        "--moe-offload-store", dest="moe_offload_store", default=None, choices=[s.value for s in Store],
        help="Where the disk tier reads full-precision experts: 'checkpoint' (its safetensors, converted to the "
        "kernel layout on every load; the default) or 'kernel' (a copy already in the kernel layout, written "
        "once under the cache directory with a progress bar and rebuilt when vLLM, the kernel or the "
        "checkpoint change; a load is then one direct read and a copy, no conversion; costs the experts' size "
        "in disk space) or 'packed' (the same copy coded losslessly, about 0.75 of the bytes for bfloat16 "
        "weights; a load reads fewer bytes and decodes them on the loader thread; CPU slots only). Needs the "
        "disk tier ('auto' picks it) and quant 'none'.",
    )
    group.add_argument(
        "--moe-offload-resident-layers", dest="moe_offload_resident_layers", default=None, type=int,
        metavar="N", help="fate: keep the first N MoE layers fully resident (default: the first layer, "
        "which cannot be predicted).",
    )
    group.add_argument(
        "--moe-offload-token-prefetch", dest="moe_offload_token_prefetch", default=None,
        action=argparse.BooleanOptionalAction,
        help="Batch-1 decode: as soon as a token is sampled, load the experts each MoE layer sent that token to "
        "the last time it saw it, before the next step's layers run (gated by how often such predictions were "
        "right). Default: on for 'fate', off for the other policies; refused with 'ondemand'.",
    )
    group.add_argument(
        "--moe-offload-layer-ahead", dest="moe_offload_layer_ahead", default=None,
        action=argparse.BooleanOptionalAction,
        help="Steps of several tokens (prefills, batches): while a MoE layer computes, load the next layer's "
        "first missing experts, told by that layer's router on this layer's input, as many as the link would "
        "otherwise idle for. Default: on for every policy but 'ondemand', where it is refused.",
    )
    group.add_argument(
        "--moe-offload-overfetch", dest="moe_offload_overfetch", default=None, type=int, metavar="K",
        help="fate: prefetch at least K predicted experts per layer (default: layer compute time over one "
        "expert's load time, measured while running, and at least top_k).",
    )
    group.add_argument(
        "--moe-offload-load-timeout-s", dest="moe_offload_load_timeout_s", default=None, type=float,
        metavar="S", help="Longest a step waits for one expert load (default 30). Past it, the requests whose "
        "tokens need that expert end with an error; other requests go on.",
    )
    group.add_argument(
        "--moe-offload-io-stuck-s", dest="moe_offload_io_stuck_s", default=None, type=float, metavar="S",
        help="An I/O thread busy this long on one load is declared stuck and the engine stops with an error "
        "instead of hanging (default 120; must exceed the load timeout).",
    )
    group.add_argument(
        "--moe-offload-replacement", dest="moe_offload_replacement", default=None, choices=REPLACEMENT_NAMES,
        help="Which expert leaves a full slot cache (lru, fate, klotski, eap): 'lru' (least recently used), "
        "'arc' (adaptive replacement cache), 'lfru' (uses over steps since the last, vLLM PR 37190), "
        "'log2decay' (llama.cpp: use count halving every 128 steps, compared in powers of two), 'ewma' "
        "(moe-surgeon: moving average of use per step), 'decay' (use count halving every 32 steps; the best "
        "demand hit rate in trace replay, `vllm-moe-offload simulate TRACE --policies all`). Default: the "
        "policy's own ('arc' for fate, 'lru' otherwise).",
    )
    group.add_argument(
        "--moe-offload-pool", dest="moe_offload_pool", default=None, choices=[p.value for p in Pool],
        help="How the budget's slots are split between MoE layers: 'shared' (one pool: the layer that runs "
        "takes slots from the others, up to all of its experts or half the pool, evicting the expert whose "
        "next use is expected farthest over the whole model; a prefill then loads each expert of a layer once "
        "instead of in passes), 'layer' (each layer its share), or 'auto' (the default: shared for "
        "full-precision experts on the CPU backend, layer for quantized experts, on CUDA, for ondemand and "
        "when --moe-offload-replacement is given).",
    )
    group.add_argument(
        "--moe-offload-profile", dest="moe_offload_profile", default=None, metavar="PATH",
        help="A saved activation profile (.npz, from `vllm-moe-offload simulate TRACE --save-profile` or "
        "--moe-offload-save-profile): the cache starts with each layer's most used experts and klotski's "
        "correlation table starts from it.",
    )
    group.add_argument(
        "--moe-offload-save-profile", dest="moe_offload_save_profile", default=None, metavar="PATH",
        help="Write the activation profile seen while serving to PATH at shutdown (for --moe-offload-profile).",
    )
    group.add_argument(
        "--moe-offload-klotski-features", dest="moe_offload_klotski_features", default=None, metavar="LIST",
        help=f"klotski: which of its parts run, 'all' (the default), 'none', or a comma-separated subset of "
        f"{','.join(KLOTSKI_FEATURES)}: 'groups' lets a step schedule more tokens so each expert load serves "
        "more of them, 'hot' prefetches only the next layer's hot experts (else the whole next layer, as many "
        "as fit), 'reorder' computes tokens whose experts are resident first and the others in waves as "
        "their experts' loads land. For ablations.",
    )
    group.add_argument(
        "--moe-offload-klotski-max-group", dest="moe_offload_klotski_max_group", default=None, type=int,
        metavar="N", help="klotski with 'groups': a step may take up to N times the engine's token budget "
        "(--max-num-batched-tokens; the runner's buffers are sized for N times it). Default 4.",
    )
    group.add_argument(
        "--moe-offload-klotski-hold-ms", dest="moe_offload_klotski_hold_ms", default=None, type=float,
        metavar="MS", help="klotski with 'groups': while expert loads dominate, hold a decode-only step with no "
        "request waiting up to MS ms (at most one step's planned loads) so that arriving requests join it; "
        "an arrival ends the hold at once. Default 0 (off): without arrivals a hold only delays the step.",
    )
    group.add_argument(
        "--moe-offload-cache-dir", dest="moe_offload_cache_dir", default=None, metavar="PATH",
        help="Directory for the expert stores of --moe-offload-quant and --moe-offload-store kernel "
        "(default: $VLLM_CACHE_ROOT/moe_offload/stores).",
    )


def fold_into_additional_config(args: argparse.Namespace, additional: dict[str, Any] | None) -> dict[str, Any]:
    """Merge the parsed flags into ``additional_config[CONFIG_KEY]`` (flags win)."""
    merged = dict(additional or {})
    given = {key: getattr(args, dest) for dest, key in FLAG_KEYS.items() if getattr(args, dest, None) is not None}
    if given:
        section = dict(merged.get(CONFIG_KEY) or {})
        section.update(given)
        merged[CONFIG_KEY] = section
    return merged
