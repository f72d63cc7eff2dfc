"""Whether a prediction's loads are worth starting: its measured precision against the link time it risks.

A prefetch ``d`` layers ahead that turns out right saves at most the compute of the ``d`` layers in between
(the load starts that much earlier than a demand load would), and never more than one load's time; one that
turns out wrong costs about one load's time: it holds the link that the next demand load waits for, or
evicts an expert a later step loads again. So a prediction's missing experts are loaded only where

    precision x min(d x layer time, load time) >= (1 - precision) x load time,

the precision being that of this layer's earlier predictions at the same distance of experts that were not
resident (those a prefetch would load), whether or not they were loaded, so a closed gate keeps measuring.
One token's step and a batch's keep apart (a prefill's prediction is nearly always right and its layers take
long). A batch's layer computes while its own missing experts load, so a prediction it makes for the next
layers queues behind those loads (``backlog_s``) and gains only the compute left after them: on the 9 GiB
model a 64-token prompt's layer misses about 8 experts of 96 MiB, 0.2 s of reads against tens of ms of
compute, and its predictions for the next layer, all right, still read 22% more (their loads evicted experts
the prompt's later layers needed) and took 13-18% longer than none. One token's layer waits for its own
loads before it computes, so its predictions keep the whole lead. With 3 MiB loads of 1.9 ms between layers
0.6 ms apart, one layer ahead needs a precision of 0.76 and three layers ahead 0.51; with 96 MiB loads of
43 ms between layers 7 ms apart, 0.86 and 0.67.

What a right prediction saves is also never more than what the demand load it replaces would have stalled
the layer: a batch's layer computes the tokens whose experts are resident while its missing ones load, so its
demand loads stall it for a fraction of their read time (on the padded tiny Mixtral's 32-request batch
about 0.26 ms per 0.8 ms load at 50%, 0.47 at 25%); the gate takes the layer's measured stall per demand
miss of that kind of step as the saving's cap (:meth:`PrefetchGate.record_stall`). And a loaded prediction
evicts a resident expert: where that expert is needed again by the next step of its layer, the prefetch cost
a load as a wrong one does, and it is counted as one (:meth:`PrefetchGate.record_harm`). Without both, fate's
batch predictions at 50% there passed the gate (0.85 of those loaded were used) while they read 21% more than
none (1692 loads against 1400 per two repetitions of the batch, in one process) and took 6% longer.

No torch, no vLLM.
"""

from __future__ import annotations

from collections.abc import Hashable

#: weight kept per prediction scored: about the last 50 predictions of a (distance, kind) count
DECAY = 0.98
#: weight of a step's stall per demand miss in its smoothed value (about the last 10 steps with misses count)
STALL_WEIGHT = 0.1


def step_kind(num_tokens: int) -> str:
    """The kind of step a prediction is kept apart by: one token's (``"token"``) or a batch's (``"batch"``)."""
    return "batch" if num_tokens > 1 else "token"


class PrefetchGate:
    """One layer's record of how often its predictions of missing experts were right, by key."""

    def __init__(self) -> None:
        self._right: dict[Hashable, float] = {}
        self._total: dict[Hashable, float] = {}
        self._stall_per_miss: dict[str, float] = {}

    def record(self, key: Hashable, predicted: int, right: int) -> None:
        """A prediction under ``key`` named ``predicted`` experts that were not resident; ``right`` were needed."""
        if not 0 <= right <= predicted:
            raise ValueError(f"right must be within 0..predicted, got {right} of {predicted}")
        if predicted == 0:
            return
        self._right[key] = self._right.get(key, 0.0) * DECAY + right
        self._total[key] = self._total.get(key, 0.0) * DECAY + predicted

    def record_harm(self, key: Hashable) -> None:
        """A loaded prediction under ``key`` evicted an expert that its layer's next step needed again: it cost a
        load, as a wrong prediction does, and counts as one."""
        self.record(key, 1, 0)

    def record_stall(self, kind: str, stall_s: float, misses: int) -> None:
        """One step of ``kind`` (:func:`step_kind`) of this layer waited ``stall_s`` for ``misses`` demand loads."""
        if misses <= 0:
            return
        per_miss = stall_s / misses
        old = self._stall_per_miss.get(kind)
        self._stall_per_miss[kind] = per_miss if old is None else (1.0 - STALL_WEIGHT) * old + STALL_WEIGHT * per_miss

    def stall_per_miss(self, kind: str) -> float | None:
        """Seconds a demand load stalled this layer's steps of ``kind``, smoothed; None before any."""
        return self._stall_per_miss.get(kind)

    def precision(self, key: Hashable) -> float:
        """Right over predicted, recent predictions weighing most; 0.5 before any (Laplace's rule)."""
        return (self._right.get(key, 0.0) + 1.0) / (self._total.get(key, 0.0) + 2.0)

    def pays(self, key: Hashable, distance: int, load_s: float | None, layer_s: float | None,
             backlog_s: float = 0.0, stall_s: float | None = None) -> bool:
        """Whether loading a prediction made ``distance`` layers ahead is expected to save more than it risks.

        ``backlog_s``: link time the prediction's loads queue behind while the layers in between compute
        (a batch's own loads); it comes off the lead. ``stall_s``: what a demand load stalls the predicted
        layer's steps of this kind (:meth:`stall_per_miss`), the most a right prediction can save; None where
        unmeasured. Open while either time is unmeasured (the first steps), as prefetching was before this gate.
        """
        if not load_s or not layer_s:
            return True
        precision = self.precision(key)
        lead_s = max(0.0, distance * layer_s - backlog_s)
        saved_s = min(lead_s, load_s) if stall_s is None else min(lead_s, load_s, stall_s)
        return precision * saved_s >= (1.0 - precision) * load_s
