"""Klotski's expert correlation table: which experts of MoE layer l follow those of layer l-1.

The table counts, per token, every pair "expert ``a`` at MoE layer ``l-1`` and
expert ``b`` at MoE layer ``l``" (``top_k * top_k`` pairs per token and layer),
plus how often each expert of each layer was chosen (the marginal). It answers
one question, before layer ``l`` routes: which ``K`` experts of layer ``l`` will
the step's tokens want most (the *hot* experts, prefetched while attention
runs)? No torch, no vLLM.

Layer indices are MoE-layer ordinals ``0 .. num_layers-1`` (the ``l``-th MoE
layer of the model, or the ``l``-th traced layer of a trace; ``layer_ids`` maps
them to the model's ``layer_idx`` where they differ, e.g. DeepSeek's dense
first layer or a trace that logs only some layers).

Use in a serving loop (one step of ``T`` tokens)::

    hot = table.hot(0, None, k)                 # layer 0: most frequent experts
    ... layer 0 routes: ids0 [T, top_k]
    table.update(0, None, ids0)
    hot = table.hot(1, ids0, k)                 # prefetch while layer 1's attention runs
    ... layer 1 routes: ids1
    table.update(1, ids0, ids1)                 # and so on

Profile file (``.npz``, read with ``allow_pickle=False``): ``meta`` (0-d str,
JSON: ``format`` = ``"vllm-moe-offload-correlation"``, ``format_version`` 1,
``model``, ``num_layers``, ``num_experts``, ``top_k``, ``layer_ids``,
``decay``, ``tokens_seen``, ``source``), ``pair_counts`` ``[L, E, E]`` float32
(row ``a`` of layer ``l`` counts the successors at ``l`` of expert ``a`` at
``l-1``; layer 0's block is zero) and ``counts`` ``[L, E]`` float32 (marginal).
Optional (older profiles lack it and still load): ``prediction_recall`` ``[L]``
float32, the share of each layer's needed experts that Fate's cross-layer
prediction named while serving (NaN: not measured, e.g. a resident layer), with
``prediction_recall_version`` 1 in ``meta``; a profile with another version of
it loads without it.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vllm_moe_offload.core.traces import Trace

PROFILE_FORMAT = "vllm-moe-offload-correlation"
PROFILE_VERSION = 1
#: version of the optional ``prediction_recall`` array (readers skip versions they do not know)
RECALL_VERSION = 1

#: up to this many ids in a step, ``CorrelationTable.update`` counts them one by one (a decode step's
#: ``top_k``: about 2 us against 9 for two bincounts and an add over E x E)
_SMALL_STEP = 16

#: ``[T, top_k]`` expert ids, as a nested list or an array
TopkIds = Sequence[Sequence[int]] | np.ndarray


class ProfileError(ValueError):
    """A profile file that cannot be read, or that belongs to another model geometry."""


class CorrelationTable:
    """Pair counts ``[L, E, E]`` and marginal counts ``[L, E]`` of one model's routing.

    ``decay`` in ``(0, 1]``: before each ``update`` of layer ``l``, that layer's
    counts are multiplied by ``decay``, so an observation ``s`` updates old
    weighs ``decay ** s`` (1 keeps every observation at full weight).
    """

    def __init__(
        self,
        num_layers: int,
        num_experts: int,
        top_k: int,
        *,
        decay: float = 1.0,
        model: str = "",
        layer_ids: Sequence[int] | None = None,
    ) -> None:
        if num_layers < 1 or num_experts < 1 or not 1 <= top_k <= num_experts:
            raise ValueError(
                f"need num_layers >= 1, num_experts >= 1 and 1 <= top_k <= num_experts; "
                f"got {num_layers}, {num_experts}, {top_k}"
            )
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must lie in (0, 1], got {decay}")
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.top_k = top_k
        self.decay = decay
        self.model = model
        self.layer_ids = tuple(range(num_layers)) if layer_ids is None else tuple(int(i) for i in layer_ids)
        if len(self.layer_ids) != num_layers:
            raise ValueError(f"{len(self.layer_ids)} layer_ids for {num_layers} layers")
        self.pair_counts = np.zeros((num_layers, num_experts, num_experts))  # [L, E(prev), E]
        self.counts = np.zeros((num_layers, num_experts))  # [L, E]
        self.tokens_seen = 0  # tokens observed at layer 0 (undecayed)
        #: [L] recall of the cross-layer prediction measured while serving (NaN: not measured), or None
        self.prediction_recall: np.ndarray | None = None

    @property
    def geometry(self) -> tuple[int, int, int]:
        """``(num_layers, num_experts, top_k)``."""
        return self.num_layers, self.num_experts, self.top_k

    def check_geometry(self, num_layers: int, num_experts: int, top_k: int) -> None:
        """Raise ``ProfileError`` unless the table was built for this geometry."""
        want = (num_layers, num_experts, top_k)
        if self.geometry != want:
            raise ProfileError(
                f"correlation profile of {self.model or 'unknown model'} has (num_layers, num_experts, top_k) = "
                f"{self.geometry}, the model has {want}; rebuild the profile for this model"
            )

    def update(self, layer_idx: int, prev_topk_ids: TopkIds | None, topk_ids: TopkIds) -> None:
        """Count one step's routing at ``layer_idx``.

        ``topk_ids`` ``[T, top_k]`` are the tokens' experts at ``layer_idx``;
        ``prev_topk_ids`` ``[T, top_k]`` the same tokens' experts at
        ``layer_idx - 1`` (row ``t`` is token ``t`` in both), or None (layer 0,
        or unknown: only the marginal is counted). Raises ``ValueError`` on
        mismatched shapes or expert ids outside ``[0, num_experts)``.
        """
        self._check_layer(layer_idx)
        cur = self._ids(topk_ids)
        if self.decay != 1.0:
            self.pair_counts[layer_idx] *= self.decay
            self.counts[layer_idx] *= self.decay
        if layer_idx == 0:
            self.tokens_seen += cur.shape[0]
        prev = None
        if prev_topk_ids is not None and layer_idx > 0:
            prev = self._ids(prev_topk_ids)
            if prev.shape[0] != cur.shape[0]:
                raise ValueError(f"prev_topk_ids has {prev.shape[0]} tokens, topk_ids has {cur.shape[0]}")
        if cur.size <= _SMALL_STEP:  # a decode step's few ids: element by element beats bincount over E x E
            counts, pairs = self.counts[layer_idx], self.pair_counts[layer_idx]
            cur_rows = cur.tolist()
            for row in cur_rows:
                for b in row:
                    counts[b] += 1
            if prev is not None:
                for before, row in zip(prev.tolist(), cur_rows):
                    for a in before:
                        for b in row:
                            pairs[a, b] += 1
            return
        self.counts[layer_idx] += np.bincount(cur.ravel(), minlength=self.num_experts)
        if prev is None:
            return
        e = self.num_experts
        # Every (a, b) pair of each token: [T, k_prev, 1] * E + [T, 1, k] -> flat indices into [E, E].
        flat = (prev[:, :, None] * e + cur[:, None, :]).ravel()
        self.pair_counts[layer_idx] += np.bincount(flat, minlength=e * e).reshape(e, e)

    def observe_tokens(self, topk_ids: np.ndarray) -> None:
        """Count ``[T, L, top_k]`` routings of ``T`` tokens through every layer (a warm-up batch)."""
        ids = np.asarray(topk_ids)
        if ids.ndim != 3 or ids.shape[1] != self.num_layers:
            raise ValueError(f"topk_ids must be [tokens, {self.num_layers}, top_k], got {ids.shape}")
        for layer in range(self.num_layers):
            self.update(layer, ids[:, layer - 1] if layer else None, ids[:, layer])

    def tendencies(self, layer_idx: int, prev_topk_ids: TopkIds | None) -> np.ndarray:
        """``[E]`` summed successor tendencies of the step's tokens at ``layer_idx``.

        Each expert ``a`` a token chose at ``layer_idx - 1`` adds row ``a`` of the
        pair counts, normalised to sum 1 (a row never seen adds the layer's
        normalised marginal instead). At layer 0, or with ``prev_topk_ids`` None,
        the result is the normalised marginal. All zeros when nothing was counted.
        """
        self._check_layer(layer_idx)
        if layer_idx == 0 or prev_topk_ids is None:
            return _normalised(self.counts[layer_idx])
        prev = self._ids(prev_topk_ids)
        # How often each expert of layer l-1 was chosen in this step: the weights of the rows. Only the
        # rows of those experts are read (a decode step's two of E; the whole transition costs E x E).
        if prev.size <= _SMALL_STEP:
            pairs = self.pair_counts[layer_idx]
            scores = np.zeros(self.num_experts)
            unseen = 0
            for expert, weight in Counter(prev.ravel().tolist()).items():
                row = pairs[expert]
                total = row.sum()
                if total > 0:
                    scores += (weight / total) * row
                else:
                    unseen += weight
            if unseen:  # rows never counted follow the layer's marginal
                scores += unseen * _normalised(self.counts[layer_idx])
            return scores
        uses = np.bincount(prev.ravel(), minlength=self.num_experts).astype(np.float64)  # [E]
        chosen = np.flatnonzero(uses)
        rows = self.pair_counts[layer_idx, chosen]  # [R, E]
        sums = rows.sum(axis=1)  # [R]
        seen = sums > 0
        scores = (uses[chosen] / np.where(seen, sums, 1.0) * seen) @ rows  # [E]
        unseen = uses[chosen][~seen].sum()
        if unseen:  # rows never counted follow the layer's marginal
            scores += unseen * _normalised(self.counts[layer_idx])
        return scores

    def transition(self, layer_idx: int) -> np.ndarray:
        """``[E(prev), E]``: row ``a`` is where a token at expert ``a`` of ``layer_idx - 1`` goes next.

        The pair counts with rows normalised to 1; a row never seen is the
        layer's normalised marginal.
        """
        marginal = _normalised(self.counts[layer_idx])  # [E]
        rows = self.pair_counts[layer_idx]  # [E, E]
        sums = rows.sum(axis=1, keepdims=True)  # [E, 1]
        return np.where(sums > 0, rows / np.where(sums > 0, sums, 1.0), marginal[None, :])

    def hot(self, layer_idx: int, prev_topk_ids: TopkIds | None, k: int) -> list[int]:
        """The ``k`` experts of ``layer_idx`` the step's tokens want most, most wanted first.

        Ranks by ``tendencies``; ties go to the more frequent expert (marginal),
        then the lower id. Only experts with a positive tendency are returned, so
        fewer than ``k`` (none, for an empty table) can come back.
        """
        return self.rank(layer_idx, self.tendencies(layer_idx, prev_topk_ids), k)

    def rank(self, layer_idx: int, scores: np.ndarray, k: int) -> list[int]:
        """The ``k`` experts of ``layer_idx`` with the highest ``scores`` ``[E]``, highest first.

        Ties (scores equal to 12 significant digits of the largest, so that the
        order in which a step's rows were summed cannot decide) go to the more
        frequent expert (marginal), then the lower id; only experts with a
        positive score are returned.
        """
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        top = float(np.max(np.abs(scores), initial=0.0))
        key = np.round(scores / top, 12) if top > 0 else scores
        order = np.lexsort((np.arange(self.num_experts), -self.counts[layer_idx], -key))
        return [int(e) for e in order[:k] if scores[e] > 0]

    def save(self, path: str | os.PathLike, source: str = "") -> Path:
        """Write the table as a profile ``.npz`` (atomically: a temporary file, then a rename)."""
        path = Path(path)
        meta = {
            "format": PROFILE_FORMAT,
            "format_version": PROFILE_VERSION,
            "model": self.model,
            "num_layers": self.num_layers,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "layer_ids": list(self.layer_ids),
            "decay": self.decay,
            "tokens_seen": self.tokens_seen,
            "source": source,
        }
        extra = {}
        if self.prediction_recall is not None:
            meta["prediction_recall_version"] = RECALL_VERSION
            extra["prediction_recall"] = np.asarray(self.prediction_recall, dtype=np.float32)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez_compressed(
                f, meta=np.array(json.dumps(meta)),
                pair_counts=self.pair_counts.astype(np.float32), counts=self.counts.astype(np.float32), **extra,
            )
        os.replace(tmp, path)
        return path

    def note_recall(self, recall: Sequence[float | None]) -> None:
        """Record each layer's measured prediction recall; layers not measured (None) keep the old value."""
        if len(recall) != self.num_layers:
            raise ValueError(f"{len(recall)} recall values for {self.num_layers} layers")
        old = self.prediction_recall if self.prediction_recall is not None else np.full(self.num_layers, np.nan)
        self.prediction_recall = np.array([o if r is None else r for o, r in zip(old, recall)], dtype=np.float64)

    def _check_layer(self, layer_idx: int) -> None:
        if not 0 <= layer_idx < self.num_layers:
            raise ValueError(f"layer_idx {layer_idx} outside [0, {self.num_layers})")

    def _ids(self, topk_ids: TopkIds) -> np.ndarray:
        ids = np.asarray(topk_ids)
        if ids.dtype != np.int64 and ids.dtype != np.int32:  # a router's int32 as it is; narrow types
            ids = ids.astype(np.int64)  # would overflow in the pair index below
        if ids.ndim == 1:  # one token
            ids = ids[None, :]
        if ids.ndim != 2:
            raise ValueError(f"topk_ids must be [tokens, top_k], got shape {ids.shape}")
        if not ids.size:
            return ids
        if ids.size <= _SMALL_STEP:
            values = ids.ravel().tolist()
            low, high = min(values), max(values)
        else:
            low, high = ids.min(), ids.max()
        if low < 0 or high >= self.num_experts:
            raise ValueError(f"expert ids must lie in [0, {self.num_experts}), got [{low}, {high}]")
        return ids


def _normalised(values: np.ndarray) -> np.ndarray:
    total = values.sum()
    return values / total if total > 0 else np.zeros_like(values)


def load_profile(path: str | os.PathLike, geometry: tuple[int, int, int] | None = None) -> CorrelationTable:
    """Read a profile written by ``CorrelationTable.save``.

    ``geometry`` ``(num_layers, num_experts, top_k)``: when given, a profile of
    another geometry is refused. Raises ``ProfileError`` (a ``ValueError``) for
    a missing or unreadable file, another format or version, or inconsistent arrays.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            pair_counts = np.asarray(data["pair_counts"], dtype=np.float64)
            counts = np.asarray(data["counts"], dtype=np.float64)
            recall = np.asarray(data["prediction_recall"], dtype=np.float64) if "prediction_recall" in data else None
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise ProfileError(f"{path} is not a readable correlation profile: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != PROFILE_FORMAT:
        raise ProfileError(f"{path} is not a {PROFILE_FORMAT} file")
    if meta.get("format_version") != PROFILE_VERSION:
        raise ProfileError(
            f"{path}: profile format version {meta.get('format_version')} is not supported (want {PROFILE_VERSION})"
        )
    try:
        table = CorrelationTable(
            int(meta["num_layers"]), int(meta["num_experts"]), int(meta["top_k"]),
            decay=float(meta.get("decay", 1.0)), model=str(meta.get("model", "")), layer_ids=meta.get("layer_ids"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ProfileError(f"{path}: bad profile metadata: {exc}") from exc
    num_layers, num_experts, _ = table.geometry
    if pair_counts.shape != (num_layers, num_experts, num_experts) or counts.shape != (num_layers, num_experts):
        raise ProfileError(
            f"{path}: arrays {pair_counts.shape} and {counts.shape} do not match "
            f"{num_layers} layers x {num_experts} experts"
        )
    if not (np.isfinite(pair_counts).all() and np.isfinite(counts).all()) or pair_counts.min(initial=0) < 0 \
            or counts.min(initial=0) < 0:
        raise ProfileError(f"{path}: counts must be finite and non-negative")
    table.pair_counts, table.counts = pair_counts, counts
    table.tokens_seen = int(meta.get("tokens_seen", 0))
    if recall is not None and meta.get("prediction_recall_version") == RECALL_VERSION:
        measured = recall[~np.isnan(recall)]
        if recall.shape != (num_layers,) or measured.min(initial=0) < 0 or measured.max(initial=0) > 1:
            raise ProfileError(f"{path}: prediction_recall must be [{num_layers}] shares in [0, 1] or NaN")
        table.prediction_recall = recall
    if geometry is not None:
        table.check_geometry(*geometry)
    return table


def build_profile_from_trace(
    trace: Trace, rows: np.ndarray | None = None, decay: float = 1.0
) -> CorrelationTable:
    """A table counting ``trace``'s routing (all rows, or ``rows`` only), one step at a time.

    Works for every trace ``core.traces.load_trace`` reads (``.npz`` and the
    shared ``.jsonl``). Layers are the trace's columns; ``layer_ids`` and the
    model name come from its metadata, ``num_layers`` is the number of columns.
    With ``decay`` < 1 the trace's steps are counted in step order, one
    ``update`` per step and layer.
    """
    meta = trace.meta
    table = CorrelationTable(
        trace.num_trace_layers, meta.num_experts, meta.top_k, decay=decay, model=meta.model,
        layer_ids=meta.layer_ids,
    )
    selected = None if rows is None else set(np.asarray(rows).tolist())
    if decay == 1.0:
        ids = trace.topk_ids if rows is None else trace.topk_ids[np.asarray(rows)]
        table.observe_tokens(ids)
        return table
    for step in trace.step_rows():
        if selected is not None:
            step = np.array([r for r in step.tolist() if r in selected], dtype=np.int64)
        if len(step):
            table.observe_tokens(trace.topk_ids[step])
    return table
