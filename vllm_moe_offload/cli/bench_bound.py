"""The physical bound of every ``vllm-moe-offload bench`` run, and each run's fraction of it.

DESIGN.md section 5: for one workload on one machine the bound is
``max(compute floor, I/O floor)``. Here, per workload (batch-1 decode, prefill, batch):

* **compute floor**: stock vLLM's time on the workload with every expert
  resident, measured in the same bench and taken with the same statistic as a
  run's time (the median, see *fraction*): the median of stock's timings (its
  timed engines and the rounds of the stock engine that records the routing:
  same settings and prompts; the recorder runs in its first round only), or the
  median of a plugin run that holds every expert in a slot (a 100% budget)
  where that is lower: on the CPU backend they run the worker in the
  engine-core process (``patches/cpu_executor.py``), one process fewer than
  stock. The fastest single all-resident timing is kept beside it
  (``fastest_resident_s``): a floor taken from it let noise alone score runs
  low (stock's own median scored 0.74 of it on the padded tiny Mixtral's decode
  on 2026-12-06, the same engine at a 100% budget 0.77);
* **I/O floor**: the expert loads of the optimal cache (:func:`optimal_loads`)
  for the workload's recorded routing with the run's slots per layer
  (``layer_slots`` of its statistics; a run with one pool for its layers,
  ``pool = shared``: one optimal cache of all those slots,
  :func:`pooled_routing_loads`), times the run's ``expert_bytes`` (a packed
  store's runs: the bytes their loads read per expert, :func:`stored_expert_bytes`), over
  the tier's read bandwidth: the faster of a probe that reads the way the run
  reads (:func:`read_bandwidth`: direct I/O, one expert per read, the run's
  I/O threads and emulated link) and the fastest rate the runs' own loads
  achieved on one workload (:func:`achieved_gbps`). The probe reads the
  checkpoint; a store's file, or data the disk's host holds in its cache, can
  read faster, and a bound taken from a slower rate than a run achieved would
  let that run pass it;
* **fraction**: bound over the run's wall time on the workload (1.0: at the
  bound; no run can exceed it by more than noise); with ``bench --rounds N``
  the median of the run's N timings (:func:`median_time_s`), and every timing
  of stock and of all-resident runs counts for the compute floor.
* **causal floor** (batch-1 decode, :data:`CAUSAL_WORKLOADS`): the bound takes
  the workload's floors over all its steps, as if the prompt's loads could
  overlap the decode's compute; they cannot. No generated token after the first
  starts before the prompt's step has run, and that step needs its experts: at
  least the optimal cache's loads for that step alone (warm as above). So no
  run ends before ``max(those loads' read time, the all-resident time to the
  first token) + the all-resident time of the tokens after it`` (each the
  lowest median of one all-resident engine's timings, as the compute floor)
  (:func:`causal_floor_s`). Where that is above the bound, a perfect policy
  scores ``bound / causal floor``, not 1.0 (``best_fraction``): on a model whose
  experts outweigh its compute, the prompt's reads dominate. Reported beside
  the bound, which stays DESIGN.md's definition.

Routing is the same for every policy (their tokens equal stock's), so one
recording per workload serves all runs. A prefill needs every expert its prompt
routes to once per layer, whatever chunks the engine cuts it into
(``merge=True`` of :func:`layer_accesses`). No vLLM import here; the bandwidth
probe imports the runtime's reader (torch) when it runs.
"""

from __future__ import annotations

import os
import random
import re
import threading
import time
from collections.abc import Callable, Collection, Sequence

import numpy as np

from vllm_moe_offload.core.belady import next_use_table
from vllm_moe_offload.core.config import OffloadConfig, Quant, Store

#: a routed expert's checkpoint tensors: "<prefix>.experts.<e>.<proj>.weight" (grouped by prefix and e)
_EXPERT_TENSOR = re.compile(r"^(.*\.experts\.\d+)\.")
#: seconds the bandwidth probe reads for: enough reads (hundreds of 3 MiB experts at ~1 GB/s) that one slow
#: read does not move the mean, short next to the engines' minutes
PROBE_S = 2.0
#: the probe of ``bench --quick`` (a smoke test: timing does not matter)
QUICK_PROBE_S = 0.3
#: the workloads whose whole routing is one need per layer (a prompt's experts, each loaded once)
MERGED_WORKLOADS = ("prefill",)
#: a workload's loads give an achieved read rate from this many on (the rate of a few loads is noise)
MIN_LOADS_FOR_RATE = 16
#: the workloads of one request whose routing's first step is its prompt and every later step one generated
#: token: their causal floor (:func:`causal_floor_s`) is measured
CAUSAL_WORKLOADS = ("decode",)


def optimal_loads(accesses: Sequence[Collection[int]], num_experts: int, capacity: int, warm: bool = True) -> int:
    """Fewest expert loads of one layer's cache of ``capacity`` slots over steps that need ``accesses``.

    A step needing at most ``capacity`` experts holds them all at once (a token
    computes with its experts resident). A larger step (many tokens of a
    prefill) loads each missing expert once and then keeps any ``capacity`` of
    what it held: a lower bound, since a run packs such a step into passes and
    may load an expert more than once. Between steps the cache keeps the experts
    needed soonest (Belady's rule), which is optimal for both kinds of step
    (``tests/bench/test_bench_bound.py`` checks it against a search of every
    choice).

    ``warm``: the cache starts holding the ``capacity`` experts needed first,
    free (a run's cache is warm from its warm-up and earlier workloads, so any
    content may be there). ``warm=False`` starts empty; when every step fits,
    the count is then ``core.belady.belady_misses``'s.
    """
    return sum(optimal_misses(accesses, num_experts, capacity, warm))


def _soonest(experts: Collection[int], next_use: np.ndarray, count: int) -> list[int]:
    """The ``count`` experts of ``experts`` needed soonest (ties: lower id)."""
    return sorted(experts, key=lambda e: (next_use[e], e))[:count]


def layer_accesses(steps: Sequence[Sequence[Sequence[Sequence[int]]]], num_layers: int,
                   merge: bool = False) -> list[list[set[int]]]:
    """Per layer, the experts each step needs.

    ``steps[s][t][l]``: the routed expert ids of token ``t`` of step ``s`` at MoE
    layer ``l``. ``merge``: the whole routing as one step (a prefill's prompt).
    """
    per_layer = [[{e for token in step for e in token[layer]} for step in steps] for layer in range(num_layers)]
    if merge:
        return [[set().union(*needs)] for needs in per_layer]
    return per_layer


def routing_loads(steps: Sequence, layer_slots: Sequence[int], num_experts: int, merge: bool = False) -> list[int]:
    """Optimal loads of every layer (``layer_slots[l]`` slots each) over a recorded routing."""
    if steps and len(steps[0][0]) != len(layer_slots):
        raise ValueError(f"the routing has {len(steps[0][0])} MoE layers, the run {len(layer_slots)}")
    accesses = layer_accesses(steps, len(layer_slots), merge)
    return [optimal_loads(needs, num_experts, slots) for needs, slots in zip(accesses, layer_slots)]


def pooled_routing_loads(steps: Sequence, layer_slots: Sequence[int], num_experts: int,
                         merge: bool = False) -> list[int]:
    """Optimal loads per layer when the layers with fewer slots than experts share one pool of their slots.

    A run with ``pool = shared`` (``core/shared_pool.py``) is bounded by the optimal cache of the same
    organisation: one cache over every (layer, expert), needed in run order (a step's layers one after
    another), with as many slots as the shared layers' shares together. Belady's rule is optimal for it
    too, and it never loads more than optimal caches per layer of the same slots (it may keep any split of
    them). Layers holding every expert load nothing.
    """
    if steps and len(steps[0][0]) != len(layer_slots):
        raise ValueError(f"the routing has {len(steps[0][0])} MoE layers, the run {len(layer_slots)}")
    accesses = layer_accesses(steps, len(layer_slots), merge)
    shared = [layer for layer, n in enumerate(layer_slots) if n < num_experts]
    loads = [0] * len(layer_slots)
    if not shared:
        return loads
    # one need per (step, layer) in run order, keyed layer * num_experts + expert
    order = [(step, layer) for step in range(len(accesses[0])) for layer in shared]
    sequence = [{layer * num_experts + e for e in accesses[layer][step]} for step, layer in order]
    misses = optimal_misses(sequence, len(layer_slots) * num_experts, sum(layer_slots[layer] for layer in shared))
    for (_, layer), need in zip(order, misses):
        loads[layer] += need
    return loads


def optimal_misses(accesses: Sequence[Collection[int]], num_experts: int, capacity: int,
                   warm: bool = True) -> list[int]:
    """:func:`optimal_loads`'s loads, step by step (also of one shared pool, keyed ``layer * E + expert``:
    :func:`pooled_routing_loads`, ``scripts/measure/pool_floor.py``)."""
    if capacity < 1:
        raise ValueError(f"a cache needs at least 1 slot, got {capacity}")
    upcoming = next_use_table(accesses, num_experts)  # [P + 1, E]: each expert's next step of need
    resident = set(_soonest(range(num_experts), upcoming[0], capacity)) if warm else set()
    out = []
    for p, needed in enumerate(accesses):
        needed = set(needed)
        out.append(len(needed - resident))
        if len(needed) <= capacity:
            resident = needed | set(_soonest(resident - needed, upcoming[p + 1], capacity - len(needed)))
        else:
            resident = set(_soonest(resident | needed, upcoming[p + 1], capacity))
    return out


def workload_bound(loads: Sequence[int], expert_bytes: int, read_gbps: float, compute_floor_s: float,
                   time_s: float) -> dict:
    """Floors, bound and fraction of one run on one workload (seconds; ``read_gbps`` in 10^9 bytes/s)."""
    io_floor_s = sum(loads) * expert_bytes / (read_gbps * 1e9)
    bound_s = max(compute_floor_s, io_floor_s)
    return {
        "loads": int(sum(loads)),
        "loads_per_layer": [int(n) for n in loads],
        "bytes": int(sum(loads)) * expert_bytes,
        "compute_floor_s": compute_floor_s,
        "io_floor_s": io_floor_s,
        "bound_s": bound_s,
        "limited_by": "I/O" if io_floor_s > compute_floor_s else "compute",
        "time_s": time_s,
        "fraction": bound_s / time_s,
    }


def causal_floor_s(first_step_loads: int, expert_bytes: int, read_gbps: float, first_token_floor_s: float,
                   after_first_floor_s: float) -> float:
    """The earliest a one-request workload can end: its prompt's step, then the tokens after the first.

    The prompt's step ends no earlier than its own loads' read time (``first_step_loads``
    of ``expert_bytes`` at ``read_gbps``, 10^9 bytes/s) and no earlier than the all-resident
    time to the first token (:func:`phase_floors`); every later token waits for the one before.
    """
    first_step_s = max(first_step_loads * expert_bytes / (read_gbps * 1e9), first_token_floor_s)
    return first_step_s + after_first_floor_s


def phase_floors(groups: Sequence[Sequence[dict]]) -> tuple[float, float] | None:
    """The all-resident time to the first token and of the tokens after it, in seconds: per group of
    measurements of a one-request workload (one engine configuration: its timed runs and rounds, vLLM's TTFT
    and mean TPOT), the median of each; the lowest median over the groups, as the compute floor
    (:func:`resident_floor_s`). None where no group measured both."""
    firsts, afters = [], []
    for workloads in groups:
        pairs = [(ttft, tpot * (w["generated_tokens"] - 1)) for w in workloads
                 if w.get("generated_tokens") and w.get("requests", 1) == 1 for ttft, tpot in phase_timings(w)]
        if pairs:
            firsts.append(float(np.median([first for first, _ in pairs])))
            afters.append(float(np.median([after for _, after in pairs])))
    if not firsts:
        return None
    return min(firsts), min(afters)


def resident_floor_s(groups: Sequence[Sequence[float]]) -> float:
    """The compute floor from the all-resident timings of a workload, one group per engine configuration
    (stock's; each all-resident plugin run's): the lowest of the groups' medians, the statistic a run's own
    time is taken with (:func:`median_time_s`), so that noise moves both alike."""
    return min(float(np.median(times)) for times in groups if times)


def phase_timings(workload: dict) -> list[tuple[float, float]]:
    """``(TTFT, mean TPOT)`` of each timing of one run's workload that measured both: the timed one, then its
    rounds' (``bench --rounds``, and ``--repeats``' later engines)."""
    pairs = [(workload.get("ttft_s"), workload.get("tpot_s")),
             *zip(workload.get("round_ttft_s", []), workload.get("round_tpot_s", []))]
    return [(ttft, tpot) for ttft, tpot in pairs if ttft is not None and tpot is not None]


def read_bandwidth(model: str, io_threads: int = 1, direct_io: bool = True, duration_s: float = PROBE_S,
                   link_gbps: float | None = None, link_latency_ms: float = 0.0, seed: int = 0) -> dict:
    """Read bandwidth of ``model``'s checkpoint, read the way a disk-tier run loads experts.

    ``io_threads`` threads read random routed experts for ``duration_s``, each
    expert as the runtime reads it (``TensorReader.read_then``: its tensors in
    one aligned read into a page-aligned buffer, with ``O_DIRECT`` unless
    ``direct_io`` is off or the filesystem refuses it), paced by the emulated
    link when one is set. ``gbps``: expert payload bytes (the tensors' own
    bytes, not the alignment around them) per second, in 10^9 bytes/s.
    """
    from vllm_moe_offload.runtime.safetensors_io import CheckpointIndex, ThreadLocalReaders
    from vllm_moe_offload.runtime.transfer import LinkEmulator

    if io_threads < 1 or duration_s <= 0:
        raise ValueError(f"need at least one thread and a positive duration, got {io_threads} and {duration_s}")
    index = CheckpointIndex(model)
    experts: dict[str, list] = {}
    for name in index.names():
        if m := _EXPERT_TENSOR.match(name):
            experts.setdefault(m.group(1), []).append(index[name])
    if not experts:
        raise ValueError(f"{model} has no routed expert tensors to read")
    groups = [experts[k] for k in sorted(experts)]
    link = LinkEmulator(link_gbps, link_latency_ms)
    readers = ThreadLocalReaders(direct_io, lanes=io_threads)
    counts = [[0, 0] for _ in range(io_threads)]  # per thread: reads, payload bytes
    started = time.perf_counter()
    deadline = started + duration_s

    def read_until_deadline(thread: int) -> None:
        rng = random.Random(seed + thread)
        reader = readers.get()
        while time.perf_counter() < deadline:
            locations = rng.choice(groups)
            began = time.perf_counter()
            reader.read_then(locations, lambda tensors: ())
            payload = sum(loc.num_bytes for loc in locations)
            link.pace(payload, began)
            counts[thread][0] += 1
            counts[thread][1] += payload

    threads = [threading.Thread(target=read_until_deadline, args=(i,), daemon=True) for i in range(io_threads)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed_s = time.perf_counter() - started
    finally:
        readers.close()
    reads, payload = (sum(c[i] for c in counts) for i in (0, 1))
    return {
        "io_threads": io_threads,
        "direct_io": direct_io and all(_accepts_direct_io(path) for path in {g[0].path for g in groups}),
        "link": link.describe(),
        "seconds": elapsed_s,
        "reads": reads,
        "payload_bytes": payload,
        "gbps": payload / elapsed_s / 1e9,
        "ms_per_read": 1e3 * elapsed_s * io_threads / reads if reads else None,
    }


def _accepts_direct_io(path: str) -> bool:
    """Does the filesystem of ``path`` open it with ``O_DIRECT`` (tmpfs refuses)?"""
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
    except (OSError, AttributeError):
        return False
    return True


def add_bounds(runs: list[dict], routing: dict, config_of: Callable[[dict], OffloadConfig], model: str,
               probe_s: float = PROBE_S) -> dict:
    """Give every plugin run of ``runs`` its ``bound`` per workload; what ``bench.json``'s ``bound`` holds.

    ``routing``: the result of the bench's routing job (per workload its
    ``routing``, ``[step][token][layer][k]`` expert ids, its ``tokens`` and
    times). The compute floor is the lowest median of stock's times and of
    each of the plugin's all-resident runs (:func:`_all_resident`,
    :func:`resident_floor_s`).
    ``config_of(run)``: the run's offload settings. One bandwidth probe per
    distinct read path (I/O threads, direct I/O, emulated link). Runs that do
    not read full-precision experts from disk get ``{"skipped": why}``.
    """
    stock = next(r for r in runs if r["kind"] == "stock")
    # stock's timed run is missing where it did not finish (killed under --memory-limit)
    stock_s = {name: [*timings(stock["workloads"].get(name, {})), *timings(w)]
               for name, w in routing["workloads"].items()}
    resident_runs = [r for r in runs if _all_resident(r)]
    resident_s = {name: [t for r in resident_runs for t in timings(r["workloads"].get(name, {}))]
                  for name in routing["workloads"]}
    floors = {name: resident_floor_s([stock_s[name], *(timings(r["workloads"].get(name, {})) for r in resident_runs)])
              for name in routing["workloads"]}
    phases = {name: phase_floors([[w for w in (stock["workloads"].get(name), routing["workloads"][name]) if w],
                                  *([r["workloads"][name]] for r in resident_runs if name in r["workloads"])])
              for name in CAUSAL_WORKLOADS if name in routing["workloads"]}
    probes: dict[tuple, dict] = {}
    loads: dict[tuple, list[int]] = {}
    bounded = []
    for run in runs:
        stats = run.get("offload")
        if run["kind"] == "stock" or not stats:
            continue
        config = config_of(run)
        why = _unbounded(stats, config)
        if why:
            run["bound"] = {"skipped": why}
            continue
        read = {"io_threads": config.io_threads, "direct_io": config.direct_io, "link_gbps": config.link_gbps,
                "link_latency_ms": config.link_latency_ms}
        key = tuple(read.values())
        if key not in probes:
            probes[key] = {**read_bandwidth(model, duration_s=probe_s, **read), "achieved_gbps": None}
        probe = probes[key]
        for name, rate in achieved_gbps(run, config.io_threads).items():
            if probe["achieved_gbps"] is None or rate > probe["achieved_gbps"]:
                probe["achieved_gbps"], probe["achieved_by"] = rate, f"{run['name']}, {name}"
        bounded.append((run, stats, probe))
    for probe in probes.values():
        probe["used_gbps"] = max(probe["gbps"], probe["achieved_gbps"] or 0.0)
    for run, stats, probe in bounded:
        run["bound"] = {"read_gbps": probe["used_gbps"]}
        expert_bytes = stats["expert_bytes"]
        if config_of(run).store is Store.PACKED:  # the bytes an expert takes on the disk, as its loads read them
            expert_bytes = run["bound"]["expert_bytes"] = stored_expert_bytes(run) or expert_bytes
        pooled = stats.get("pool") == "shared"
        count = pooled_routing_loads if pooled else routing_loads
        for name, recorded in routing["workloads"].items():
            slots = (tuple(stats["layer_slots"]), pooled)
            if (name, slots) not in loads:
                loads[name, slots] = count(recorded["routing"], slots[0], stats["num_experts"],
                                           merge=name in MERGED_WORKLOADS)
            workload = run["workloads"][name]
            run["bound"][name] = workload_bound(loads[name, slots], expert_bytes, probe["used_gbps"],
                                                floors[name], median_time_s(workload))
            run["bound"][name]["fastest_resident_s"] = min(stock_s[name] + resident_s[name])
            if phases.get(name) and recorded["routing"]:
                if (name, slots, "first") not in loads:
                    loads[name, slots, "first"] = count(recorded["routing"][:1], slots[0], stats["num_experts"])
                first_loads = sum(loads[name, slots, "first"])
                floor_s = causal_floor_s(first_loads, expert_bytes, probe["used_gbps"], *phases[name])
                bound_s = run["bound"][name]["bound_s"]
                run["bound"][name].update(first_step_loads=first_loads, first_token_floor_s=phases[name][0],
                                          after_first_floor_s=phases[name][1], causal_floor_s=floor_s,
                                          best_fraction=min(1.0, bound_s / floor_s))
            if "engine_wall_s" in workload:  # bench --repeats: each engine's own fraction, from its median
                bound_s = run["bound"][name]["bound_s"]
                run["bound"][name]["engine_fractions"] = [
                    bound_s / float(np.median(times)) for times in workload["engine_wall_s"] if times]
    return {
        "stock_wall_s": stock_s,
        "resident_wall_s": resident_s,
        "routing_steps": {name: len(w["routing"]) for name, w in routing["workloads"].items()},
        "routing_tokens_match_stock": {name: w["tokens"] == stock["workloads"][name].get("tokens")
                                       for name, w in routing["workloads"].items() if name in stock["workloads"]},
        "merged_workloads": list(MERGED_WORKLOADS),
        "bandwidth": list(probes.values()),
    }


def stored_expert_bytes(run: dict) -> int | None:
    """Bytes per load over all of ``run``'s workloads (whole 4 KiB blocks, as read): what one expert takes on
    the disk where that is not ``expert_bytes`` (a packed store's blocks vary); None without loads."""
    workloads = [w.get("offload") or {} for w in run.get("workloads", {}).values()]
    loads = sum(w.get("loads", 0) for w in workloads)
    return round(sum(w.get("bytes_read", 0) for w in workloads) / loads) if loads else None


def achieved_gbps(run: dict, io_threads: int) -> dict[str, float]:
    """Per workload of ``run`` with at least :data:`MIN_LOADS_FOR_RATE` loads: the rate its reads achieved.

    Bytes read over the seconds the I/O threads spent reading (``read_s``, summed
    over threads), times the threads: the link's rate where every thread read at
    once, more where they did not (so the bound it gives is never too strict).
    In 10^9 bytes/s. Runs recorded before ``read_s`` existed give none.
    """
    out = {}
    for name, workload in run.get("workloads", {}).items():
        stats = workload.get("offload") or {}
        if stats.get("loads", 0) >= MIN_LOADS_FOR_RATE and stats.get("read_s", 0) > 0 and stats.get("bytes_read"):
            out[name] = stats["bytes_read"] * io_threads / stats["read_s"] / 1e9
    return out


def timings(workload: dict) -> list[float]:
    """Every wall time of one run's workload: the timed one, then its repeats (``bench --rounds``); [] if none."""
    return [*([workload["wall_s"]] if "wall_s" in workload else []), *workload.get("round_wall_s", [])]


def median_time_s(workload: dict) -> float:
    """The run's time on a workload for its fraction: the median of its timings (of an even count, the mean of
    the middle two); the one timing without ``bench --rounds``."""
    return float(np.median(timings(workload)))


def _all_resident(run: dict) -> bool:
    """A plugin run whose every layer holds every expert in a slot: nothing is loaded while it serves."""
    stats = run.get("offload")
    return run["kind"] != "stock" and bool(stats) and all(n == stats["num_experts"] for n in stats["layer_slots"])


def _unbounded(stats: dict, config: OffloadConfig) -> str | None:
    """Why a run's I/O floor is not measured here, or None."""
    if stats.get("tier") != "disk":
        return f"tier {stats.get('tier')!r}: only the disk tier's reads are probed"
    if config.quant is not Quant.NONE:
        return f"quant {config.quant.value!r} reads fewer bytes than expert_bytes"
    return None
