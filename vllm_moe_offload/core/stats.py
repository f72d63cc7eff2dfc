"""Counters of the expert cache, per layer and summed. Plain Python, picklable."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field


@dataclass
class LayerStats:
    """What one MoE layer's cache saw.

    ``hits``/``misses`` count (step, expert) needs: an expert needed by several
    tokens of one pass counts once. ``stall_s`` is the time the forward pass
    waited for loads to finish.
    """

    layer_idx: int = -1
    num_slots: int = 0
    hits: int = 0
    misses: int = 0
    loads: int = 0
    passes: int = 0
    steps: int = 0
    stall_s: float = 0.0
    bytes_read: dict[str, int] = field(default_factory=dict)
    slot_bytes: int = 0
    resident: int = 0

    def add_read(self, tier: str, num_bytes: int) -> None:
        self.bytes_read[tier] = self.bytes_read.get(tier, 0) + num_bytes

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 1.0

    def to_dict(self) -> dict:
        out = asdict(self)
        out["hit_rate"] = self.hit_rate
        return out


def summarize(layers: Iterable[dict]) -> dict:
    """Sum per-layer stat dicts (as returned by ``LayerStats.to_dict``)."""
    total = {
        "layers": 0, "hits": 0, "misses": 0, "loads": 0, "passes": 0,
        "stall_s": 0.0, "bytes_read": {}, "slot_bytes": 0, "slots": 0, "resident": 0,
    }
    for layer in layers:
        total["layers"] += 1
        for key in ("hits", "misses", "loads", "passes", "stall_s", "slot_bytes", "resident"):
            total[key] += layer[key]
        total["slots"] += layer["num_slots"]
        for tier, num in layer["bytes_read"].items():
            total["bytes_read"][tier] = total["bytes_read"].get(tier, 0) + num
    needed = total["hits"] + total["misses"]
    total["hit_rate"] = total["hits"] / needed if needed else 1.0
    return total


def format_summary(total: dict) -> str:
    """One log line: hits, misses, bytes per tier, stall, slots in use."""
    reads = ", ".join(f"{t} {n / 2**20:.1f} MiB" for t, n in sorted(total["bytes_read"].items())) or "none"
    return (
        f"{total['layers']} layers, hit rate {total['hit_rate']:.3f} "
        f"({total['hits']} hits, {total['misses']} misses), {total['loads']} loads, "
        f"read {reads}, stall {total['stall_s'] * 1e3:.1f} ms, "
        f"{total['resident']}/{total['slots']} slots in use, "
        f"slot memory {total['slot_bytes'] / 2**20:.1f} MiB"
    )
