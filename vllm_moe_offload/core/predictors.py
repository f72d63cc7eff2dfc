"""Predictors: which experts a layer will need, asked before the layer runs.

The replay calls, for every step: ``begin_step`` once, then per traced layer
``predict`` (before the layer's routing is known) and ``observe`` (after). A
predictor may read the trace's bookkeeping (sequence ids, positions, token ids
and, for cross-layer gate prediction, ``hidden`` of layers already run) but
never ``topk_ids`` of the step it predicts: routing arrives through ``observe``.
``layer`` is an index into the trace's layer axis (``trace.meta.layer_ids``
maps it to the model's ``layer_idx``).
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np

from vllm_moe_offload.core.correlation import CorrelationTable, build_profile_from_trace
from vllm_moe_offload.core.traces import Trace


class Predictor(ABC):
    """Base of every predictor; subclasses implement ``predict``."""

    #: short name used in reports and policy specs such as ``lru+eap``
    name: str = ""

    def __init__(self, top_n: int) -> None:
        if top_n < 1:
            raise ValueError(f"top_n must be at least 1 expert, got {top_n}")
        self.top_n = top_n
        self.trace: Trace | None = None
        self.rows = np.zeros(0, dtype=np.int64)

    def reset(self, trace: Trace) -> None:
        """Start a replay of ``trace`` (called once, before any step)."""
        self.trace = trace

    def begin_step(self, step: int, rows: np.ndarray) -> None:
        """Step ``step`` runs the trace rows ``rows`` (its tokens, in batch order)."""
        self.rows = rows

    @abstractmethod
    def predict(self, step: int, layer: int) -> list[int]:
        """At most ``top_n`` distinct expert ids for ``layer`` in this step, best first."""

    def observe(self, step: int, layer: int, topk_ids: np.ndarray) -> None:
        """The real routing ``[T, k]`` of this step's rows at ``layer``."""

    def end_sequence(self, seq_id: int) -> None:
        """Sequence ``seq_id`` produced its last token in this replay."""


class ActivationPathPredictor(Predictor):
    """Expert-activation-path matching in the style of MoE-Infinity.

    Each running request keeps an activation matrix ``[L, E]`` of how often
    each expert served it so far (including earlier layers of the current step).
    It is matched by cosine similarity against the matrices of finished
    requests (the warm-up ``history`` plus requests finished earlier in the
    replay); the best match's counts at ``layer`` rank the experts to prefetch.
    Edge cases: with no history the request's own counts rank the experts; a
    request with no counts yet uses the sum of the history; with neither it
    predicts nothing. In a batch, each request's ranking is normalised to sum 1
    and the rankings are added.
    """

    name = "eap"

    def __init__(self, top_n: int, history: Sequence[np.ndarray] = ()) -> None:
        super().__init__(top_n)
        self._warmup = [np.asarray(h, dtype=np.float64) for h in history]
        self._history: list[np.ndarray] = []
        self._unit_history = np.zeros((0, 0))
        self._current: dict[int, np.ndarray] = {}

    def reset(self, trace: Trace) -> None:
        super().reset(trace)
        self._current = {}
        self._history = []
        for matrix in self._warmup:
            self._remember(matrix)

    def predict(self, step: int, layer: int) -> list[int]:
        assert self.trace is not None, "reset() was not called"
        scores = np.zeros(self.trace.meta.num_experts)
        for seq in np.unique(self.trace.seq_ids[self.rows]).tolist():
            row = self._expected(seq, layer)
            if row.sum() > 0:
                scores += row / row.sum()
        order = np.argsort(-scores, kind="stable")[: self.top_n]
        return [int(e) for e in order if scores[e] > 0]

    def observe(self, step: int, layer: int, topk_ids: np.ndarray) -> None:
        assert self.trace is not None, "reset() was not called"
        shape = (self.trace.num_trace_layers, self.trace.meta.num_experts)
        for seq, experts in zip(self.trace.seq_ids[self.rows].tolist(), topk_ids):
            matrix = self._current.setdefault(seq, np.zeros(shape))
            np.add.at(matrix[layer], experts, 1)

    def end_sequence(self, seq_id: int) -> None:
        matrix = self._current.pop(seq_id, None)
        if matrix is not None and matrix.any():
            self._remember(matrix)

    def _remember(self, matrix: np.ndarray) -> None:
        self._history.append(matrix)
        flat = np.stack([h.ravel() for h in self._history])
        self._unit_history = flat / np.linalg.norm(flat, axis=1, keepdims=True)

    def _expected(self, seq: int, layer: int) -> np.ndarray:
        current = self._current.get(seq)
        has_counts = current is not None and current.any()
        if not self._history:
            return current[layer] if has_counts else np.zeros(self.trace.meta.num_experts)
        if not has_counts:
            return sum(h[layer] for h in self._history)
        best = int(np.argmax(self._unit_history @ current.ravel()))
        return self._history[best][layer]


class OraclePredictor(Predictor):
    """Knows the step's routing: the ceiling of prediction (tests, upper bounds).

    Predicts the experts the step's tokens are routed to at ``layer``, in order
    of first appearance (token order, then gate order), cut to ``top_n``.
    """

    name = "oracle"

    def predict(self, step: int, layer: int) -> list[int]:
        assert self.trace is not None, "reset() was not called"
        needed = self.trace.topk_ids[self.rows, layer].ravel().tolist()
        return list(dict.fromkeys(needed))[: self.top_n]


class CorrelationPredictor(Predictor):
    """Klotski's correlation-aware prefetcher (``core.correlation``).

    Layer ``l`` of a step is predicted from the routing the step's tokens just
    had at layer ``l-1``: their summed successor tendencies, top ``top_n``
    (layer 0: the most frequent experts). The table starts from ``table`` (a
    profile or a warm-up; copied, never changed) or empty, and counts every
    routing the replay shows it after predicting (online, as in the paper).
    Edge case: an empty table predicts nothing.
    """

    name = "corr"

    def __init__(self, top_n: int, table: CorrelationTable | None = None) -> None:
        super().__init__(top_n)
        self._initial = table
        self.table: CorrelationTable | None = None
        self._prev: np.ndarray | None = None

    def reset(self, trace: Trace) -> None:
        super().reset(trace)
        meta = trace.meta
        if self._initial is None:
            self.table = CorrelationTable(
                trace.num_trace_layers, meta.num_experts, meta.top_k, model=meta.model, layer_ids=meta.layer_ids
            )
        else:
            self._initial.check_geometry(trace.num_trace_layers, meta.num_experts, meta.top_k)
            self.table = copy.deepcopy(self._initial)
        self._prev = None

    def begin_step(self, step: int, rows: np.ndarray) -> None:
        super().begin_step(step, rows)
        self._prev = None

    def predict(self, step: int, layer: int) -> list[int]:
        assert self.table is not None, "reset() was not called"
        return self.table.hot(layer, self._prev if layer else None, self.top_n)

    def observe(self, step: int, layer: int, topk_ids: np.ndarray) -> None:
        assert self.table is not None, "reset() was not called"
        self.table.update(layer, self._prev if layer else None, topk_ids)
        self._prev = np.asarray(topk_ids)


def activation_history(trace: Trace) -> list[np.ndarray]:
    """Each sequence's ``[L, E]`` activation counts over ``trace`` (warm-up history for ``eap``)."""
    shape = (trace.num_trace_layers, trace.meta.num_experts)
    out = []
    for seq in trace.sequences():
        ids = trace.topk_ids[trace.seq_ids == seq]  # [T, L, k]
        matrix = np.zeros(shape)
        for layer in range(shape[0]):
            np.add.at(matrix[layer], ids[:, layer].ravel(), 1)
        out.append(matrix)
    return out


#: predictors the simulator can combine with a cache policy
PREDICTOR_NAMES = (ActivationPathPredictor.name, CorrelationPredictor.name, OraclePredictor.name)


def make_predictor(
    name: str, top_n: int, warmup: Trace | None = None, profile: CorrelationTable | None = None
) -> Predictor:
    """Build a predictor by name.

    ``warmup``: rows replayed before the evaluation, learnt from up front
    (``eap``: its sequences become history; ``corr``: counted into the table).
    ``profile``: the starting table of ``corr`` (the warm-up is added to a copy).
    ``oracle`` needs neither.
    """
    if name == ActivationPathPredictor.name:
        return ActivationPathPredictor(top_n, activation_history(warmup) if warmup is not None else ())
    if name == CorrelationPredictor.name:
        table = copy.deepcopy(profile)
        if warmup is not None:
            if table is None:
                table = build_profile_from_trace(warmup)
            else:
                table.check_geometry(warmup.num_trace_layers, warmup.meta.num_experts, warmup.meta.top_k)
                table.observe_tokens(warmup.topk_ids)
        return CorrelationPredictor(top_n, table)
    if name == OraclePredictor.name:
        return OraclePredictor(top_n)
    raise ValueError(f"unknown predictor {name!r}; allowed: {list(PREDICTOR_NAMES)}")
