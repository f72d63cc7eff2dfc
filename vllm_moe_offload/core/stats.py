"""Counters of the expert cache, per layer and summed. Plain Python, picklable."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field


@dataclass
class LayerStats:
    """What one MoE layer's cache saw.

    ``hits``/``misses`` count (pass, expert) needs: an expert needed by several
    tokens of one pass counts once. A hit is a *demand* hit (resident without
    this step's prefetch); ``prefetch_hits`` are needs that a prefetch made
    resident, so the ready rate is ``(hits + prefetch_hits) / needs``.
    ``stall_s`` is the time the forward pass waited for loads to finish;
    ``read_s`` the time the I/O threads spent in the loads themselves (the
    slow tier's read into the slot, an emulated link's pacing included), summed
    over threads: ``bytes_read / read_s`` is the rate the reads achieved.
    Prediction counts: ``predicted_right`` of ``predicted`` experts were needed,
    out of ``needed_when_predicted`` needs of the passes that had a prediction.
    ``prefetch_skipped``: predictions cut short because no slot was free or held
    an expert the policy deems not useful; ``prefetch_cancelled``: queued loads of
    a farther prediction that a nearer one dropped, or of experts the step's
    routing did not need (not counted in ``prefetch_loads``); ``prefetch_refused``:
    predicted experts the link schedule did not admit (the link would not have
    idled before their layer ran, ``core/link.py``); ``prefetch_gated``: predicted
    missing experts not loaded because such predictions have not been right
    often enough to pay for a wrong one's load (``core/prefetch_gate.py``).
    ``distance_*``: prediction counts by look-ahead distance (recall per distance
    is ``distance_right / distance_needed``). ``token_table_predicted`` /
    ``token_table_right``: experts the next-token table predicted for the layer's
    steps (``core/token_routes.py``) and those of them the step needed; not in
    ``predicted``, which counts the routers' predictions. ``layer_ahead_predicted`` /
    ``layer_ahead_right``: the same for the experts the layer before loaded ahead in
    steps of several tokens (``integration/layer_ahead.py``).
    ``failed_loads`` are needs that could not be met (a read failed or timed
    out); ``failed_tokens`` the token rows computed without them (their
    requests fail).
    ``op_s``: the time the layer's offloaded MoE op took (from routing to
    output: planning, waits, kernel calls); ``kernel_s`` the part spent in its
    ``kernel_calls`` calls of the fused-experts kernel (on a GPU, the calls'
    host time). ``op_s - kernel_s - stall_s`` is the plugin's own work on the
    forward's thread.
    ``waves``: kernel calls that computed a pass's rows while loads it still
    waited for were in flight (rows whose experts had landed), or that
    computed a leaving expert's rows early so the next pass's load could
    start in its slot.
    """

    layer_idx: int = -1
    num_slots: int = 0
    hits: int = 0
    misses: int = 0
    prefetch_hits: int = 0
    loads: int = 0
    prefetch_loads: int = 0
    prefetch_unused: int = 0
    predicted: int = 0
    predicted_right: int = 0
    needed_when_predicted: int = 0
    passes: int = 0
    steps: int = 0
    stall_s: float = 0.0
    read_s: float = 0.0
    failed_loads: int = 0
    failed_tokens: int = 0
    low_precision_loads: int = 0
    prefetch_skipped: int = 0
    prefetch_cancelled: int = 0
    prefetch_refused: int = 0
    prefetch_gated: int = 0
    token_table_predicted: int = 0
    token_table_right: int = 0
    layer_ahead_predicted: int = 0
    layer_ahead_right: int = 0
    waves: int = 0
    op_s: float = 0.0
    kernel_s: float = 0.0
    kernel_calls: int = 0
    #: per look-ahead distance (layers between predictor and predicted): the same three counts
    distance_predicted: dict[int, int] = field(default_factory=dict)
    distance_right: dict[int, int] = field(default_factory=dict)
    distance_needed: dict[int, int] = field(default_factory=dict)
    bytes_read: dict[str, int] = field(default_factory=dict)
    slot_bytes: int = 0
    resident: int = 0

    def add_read(self, tier: str, num_bytes: int) -> None:
        self.bytes_read[tier] = self.bytes_read.get(tier, 0) + num_bytes

    def add_other(self, predictor: str, predicted: int, right: int) -> None:
        """Count one scored prediction of a predictor other than a router's (``token-table``, ``layer-ahead``)."""
        name = predictor.replace("-", "_")
        setattr(self, f"{name}_predicted", getattr(self, f"{name}_predicted") + predicted)
        setattr(self, f"{name}_right", getattr(self, f"{name}_right") + right)

    def add_distance(self, distance: int, predicted: int, right: int, needed: int) -> None:
        """Count one scored prediction made ``distance`` layers ahead."""
        for counts, num in ((self.distance_predicted, predicted), (self.distance_right, right),
                            (self.distance_needed, needed)):
            counts[distance] = counts.get(distance, 0) + num

    @property
    def needs(self) -> int:
        return self.hits + self.prefetch_hits + self.misses

    @property
    def hit_rate(self) -> float:
        return self.hits / self.needs if self.needs else 1.0

    @property
    def ready_rate(self) -> float:
        return (self.hits + self.prefetch_hits) / self.needs if self.needs else 1.0

    def to_dict(self) -> dict:
        out = asdict(self)
        out["hit_rate"] = self.hit_rate
        out["ready_rate"] = self.ready_rate
        out["precision"] = self.predicted_right / self.predicted if self.predicted else None
        out["recall"] = self.predicted_right / self.needed_when_predicted if self.needed_when_predicted else None
        out["recall_by_distance"] = {
            d: self.distance_right[d] / n for d, n in sorted(self.distance_needed.items()) if n
        }
        return out


def summarize(layers: Iterable[dict]) -> dict:
    """Sum per-layer stat dicts (as returned by ``LayerStats.to_dict``)."""
    summed = (
        "hits", "misses", "prefetch_hits", "loads", "prefetch_loads", "prefetch_unused", "passes", "stall_s", "read_s",
        "failed_loads", "failed_tokens", "low_precision_loads", "slot_bytes", "resident", "predicted", "predicted_right", "needed_when_predicted",
        "prefetch_skipped", "prefetch_cancelled", "prefetch_refused", "prefetch_gated", "token_table_predicted",
        "token_table_right", "layer_ahead_predicted", "layer_ahead_right", "waves", "op_s", "kernel_s", "kernel_calls",
    )
    total = {"layers": 0, "slots": 0, "bytes_read": {}, **{key: 0 for key in summed},
             **{key: {} for key in _BY_DISTANCE}}
    for layer in layers:
        total["layers"] += 1
        for key in summed:
            total[key] += layer.get(key, 0)
        total["slots"] += layer["num_slots"]
        for tier, num in layer["bytes_read"].items():
            total["bytes_read"][tier] = total["bytes_read"].get(tier, 0) + num
        for key in _BY_DISTANCE:
            for distance, num in layer.get(key, {}).items():
                total[key][int(distance)] = total[key].get(int(distance), 0) + num
    needed = total["hits"] + total["prefetch_hits"] + total["misses"]
    total["hit_rate"] = total["hits"] / needed if needed else 1.0
    total["ready_rate"] = (total["hits"] + total["prefetch_hits"]) / needed if needed else 1.0
    total["precision"] = total["predicted_right"] / total["predicted"] if total["predicted"] else None
    total["recall"] = (
        total["predicted_right"] / total["needed_when_predicted"] if total["needed_when_predicted"] else None
    )
    total["recall_by_distance"] = {
        d: total["distance_right"].get(d, 0) / n for d, n in sorted(total["distance_needed"].items()) if n
    }
    return total


def layer_recall(layers: Iterable[LayerStats], distance: int = 1) -> list[float | None]:
    """Each layer's recall of predictions made ``distance`` layers ahead; None where none was scored."""
    return [
        stats.distance_right.get(distance, 0) / stats.distance_needed[distance]
        if stats.distance_needed.get(distance) else None
        for stats in layers
    ]


#: per-distance prediction counts, summed key by key
_BY_DISTANCE = ("distance_predicted", "distance_right", "distance_needed")


def format_summary(total: dict) -> str:
    """One log line: hits, misses, bytes per tier, stall, slots in use."""
    reads = ", ".join(f"{t} {n / 2**20:.1f} MiB" for t, n in sorted(total["bytes_read"].items())) or "none"
    return (
        f"{total['layers']} layers, hit rate {total['hit_rate']:.3f} "
        f"({total['hits']} hits, {total['misses']} misses), ready rate {total['ready_rate']:.3f} "
        f"({total['prefetch_hits']} made ready by prefetch), {total['loads']} loads "
        f"({total['prefetch_loads']} prefetched, {total['prefetch_unused']} unused), "
        f"read {reads}, stall {total['stall_s'] * 1e3:.1f} ms, "
        + (f"{total['failed_loads']} failed loads ({total['failed_tokens']} tokens failed), "
           if total.get("failed_loads") else "")
        + f"{total['resident']}/{total['slots']} slots in use, "
        f"slot memory {total['slot_bytes'] / 2**20:.1f} MiB"
    )
