"""Routing traces: which experts every token was routed to, per MoE layer.

A trace holds one row per token that went through the model: its sequence,
its position in that sequence, the engine step (forward pass) it belonged to,
and for every traced MoE layer the routed expert ids, their router weights and
optionally the router's input (for cross-layer gate replay). No torch, no vLLM.

On-disk format (``.npz`` written with ``numpy.savez_compressed``; read with
``numpy.load(path, allow_pickle=False)``, nothing else needed). ``N`` is the
number of rows (tokens), ``L`` the number of traced layers, ``k`` the model's
``top_k``, ``H`` its hidden size:

==============  ================  ===================================================
array           shape, dtype      meaning
==============  ================  ===================================================
``meta``        0-d str           JSON object, see below
``topk_ids``    [N, L, k] int16   routed expert ids, highest weight first (int32
                                  when ``num_experts`` exceeds 32767)
``topk_weights`` [N, L, k] f32    router weights of those experts (float16 accepted)
``token_ids``   [N] int32         input token id; -1 when unknown
``seq_ids``     [N] int32         sequence (request) number, 0-based
``positions``   [N] int32         token index within its sequence
``step_ids``    [N] int32         engine step; the rows of one forward pass share it
``hidden``      [N, L, H] f16     optional: router input of each traced layer
==============  ================  ===================================================

``meta`` keys: ``format`` (always ``"vllm-moe-offload-trace"``), ``format_version``
(1), ``model``, ``num_layers`` (MoE layers of the model), ``num_experts``,
``top_k``, ``layer_ids`` (model layer index of each of the ``L`` columns),
``expert_bytes`` (bytes of one expert, or null), ``seq_names`` (original request
ids, or null), ``source`` and ``notes`` (free text).

Rows are in the order they were recorded. A sequence's rows have distinct
positions; nothing else about row order is assumed by readers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

FORMAT_NAME = "vllm-moe-offload-trace"
FORMAT_VERSION = 1

_ARRAYS = ("topk_ids", "topk_weights", "token_ids", "seq_ids", "positions", "step_ids")


@dataclass(frozen=True)
class TraceMeta:
    """What model a trace came from and how its layer columns map to the model."""

    model: str
    num_layers: int
    num_experts: int
    top_k: int
    layer_ids: tuple[int, ...]
    expert_bytes: int | None = None
    seq_names: tuple[str, ...] | None = None
    source: str = ""
    notes: str = ""

    def to_json(self) -> str:
        out = asdict(self)
        out["layer_ids"] = list(self.layer_ids)
        out["seq_names"] = None if self.seq_names is None else list(self.seq_names)
        return json.dumps({"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **out})

    @classmethod
    def from_json(cls, text: str) -> TraceMeta:
        """Parse ``meta``; raises ``ValueError`` on another format or a newer version."""
        raw = json.loads(text)
        if raw.pop("format", None) != FORMAT_NAME:
            raise ValueError(f"not a {FORMAT_NAME} file (meta: {text[:80]!r})")
        version = raw.pop("format_version", None)
        if version != FORMAT_VERSION:
            raise ValueError(f"trace format version {version} is not supported (want {FORMAT_VERSION})")
        raw["layer_ids"] = tuple(raw["layer_ids"])
        if raw.get("seq_names") is not None:
            raw["seq_names"] = tuple(raw["seq_names"])
        return cls(**raw)


@dataclass(frozen=True, eq=False)
class Trace:
    """Routing of ``N`` tokens over ``L`` traced layers (arrays as in the file format)."""

    meta: TraceMeta
    topk_ids: np.ndarray  # [N, L, k]
    topk_weights: np.ndarray  # [N, L, k]
    token_ids: np.ndarray  # [N]
    seq_ids: np.ndarray  # [N]
    positions: np.ndarray  # [N]
    step_ids: np.ndarray  # [N]
    hidden: np.ndarray | None = None  # [N, L, H]
    path: str = ""

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def num_tokens(self) -> int:
        return int(self.topk_ids.shape[0])

    @property
    def num_trace_layers(self) -> int:
        return int(self.topk_ids.shape[1])

    def sequences(self) -> list[int]:
        """Sequence ids in order of first appearance."""
        _, first = np.unique(self.seq_ids, return_index=True)
        return [int(self.seq_ids[i]) for i in sorted(first)]

    def sequence_rows(self, seq_id: int) -> np.ndarray:
        """Row indices of one sequence in position order (ties keep file order)."""
        rows = np.flatnonzero(self.seq_ids == seq_id)
        return rows[np.argsort(self.positions[rows], kind="stable")]

    def step_rows(self) -> list[np.ndarray]:
        """Row indices of every step, steps in ascending id, rows in file order."""
        order = np.argsort(self.step_ids, kind="stable")
        bounds = np.flatnonzero(np.diff(self.step_ids[order])) + 1
        return np.split(order, bounds) if len(order) else []

    def name(self) -> str:
        """Short label for reports: the file stem, else the model name."""
        return Path(self.path).stem if self.path else self.meta.model


def _validate(trace: Trace) -> None:
    ids = trace.topk_ids
    if ids.ndim != 3:
        raise ValueError(f"topk_ids must be [tokens, layers, top_k], got shape {ids.shape}")
    n, num_layers, top_k = ids.shape
    meta = trace.meta
    if trace.topk_weights.shape != ids.shape:
        raise ValueError(f"topk_weights shape {trace.topk_weights.shape} != topk_ids shape {ids.shape}")
    for key in ("token_ids", "seq_ids", "positions", "step_ids"):
        if getattr(trace, key).shape != (n,):
            raise ValueError(f"{key} must have shape ({n},), got {getattr(trace, key).shape}")
    if len(meta.layer_ids) != num_layers or top_k != meta.top_k:
        raise ValueError(
            f"arrays hold {num_layers} layers x top-{top_k}, meta says "
            f"{len(meta.layer_ids)} layers x top-{meta.top_k}"
        )
    if n and (ids.min() < 0 or ids.max() >= meta.num_experts):
        raise ValueError(f"expert ids must lie in [0, {meta.num_experts}), got [{ids.min()}, {ids.max()}]")
    if trace.hidden is not None and trace.hidden.shape[:2] != (n, num_layers):
        raise ValueError(f"hidden must be [{n}, {num_layers}, H], got {trace.hidden.shape}")


def save_trace(trace: Trace, path: str | os.PathLike, compress: bool = True) -> Path:
    """Write ``trace`` as one ``.npz`` (atomically: a temporary file, then a rename)."""
    path = Path(path)
    arrays = {key: getattr(trace, key) for key in _ARRAYS}
    if trace.hidden is not None:
        arrays["hidden"] = trace.hidden
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        (np.savez_compressed if compress else np.savez)(f, meta=np.array(trace.meta.to_json()), **arrays)
    os.replace(tmp, path)
    return path


def load_trace(path: str | os.PathLike) -> Trace:
    """Read a ``.npz`` trace, or a ``.jsonl`` file of ``shared/traces`` (see ``read_shared_jsonl``)."""
    path = Path(path)
    if path.suffix == ".jsonl":
        return read_shared_jsonl(path)
    with np.load(path, allow_pickle=False) as data:
        meta = TraceMeta.from_json(str(data["meta"]))
        arrays = {key: data[key] for key in _ARRAYS}
        hidden = data["hidden"] if "hidden" in data.files else None
    return Trace(meta=meta, hidden=hidden, path=str(path), **arrays)


class TraceWriter:
    """Collects steps as they run and writes one trace file at the end.

    ``add_step`` takes one engine step: the rows' sequence ids and positions and,
    per traced layer, the ``[T, k]`` routing (a list of per-layer arrays, or one
    ``[T, L, k]`` array). Every step must carry hidden states or none must.
    """

    def __init__(self, meta: TraceMeta, weights_dtype: type = np.float32) -> None:
        self.meta = meta
        self.weights_dtype = weights_dtype
        self._ids_dtype = np.int16 if meta.num_experts <= np.iinfo(np.int16).max else np.int32
        self._parts: dict[str, list[np.ndarray]] = {key: [] for key in (*_ARRAYS, "hidden")}
        self._num_steps = 0

    @property
    def num_steps(self) -> int:
        return self._num_steps

    def add_step(
        self,
        seq_ids: Sequence[int] | np.ndarray,
        positions: Sequence[int] | np.ndarray,
        topk_ids: Sequence[np.ndarray] | np.ndarray,
        topk_weights: Sequence[np.ndarray] | np.ndarray,
        token_ids: Sequence[int] | np.ndarray | None = None,
        hidden: Sequence[np.ndarray] | np.ndarray | None = None,
    ) -> None:
        """Append one step of ``T`` tokens; raises ``ValueError`` on inconsistent shapes."""
        ids = _stack_layers(topk_ids, self._ids_dtype)  # [T, L, k]
        num_tokens = ids.shape[0]
        if token_ids is None:
            token_ids = np.full(num_tokens, -1)
        if self._num_steps and (hidden is not None) != bool(self._parts["hidden"]):
            raise ValueError("every step must carry hidden states, or none may")
        step = {
            "topk_ids": ids,
            "topk_weights": _stack_layers(topk_weights, self.weights_dtype),
            "token_ids": np.asarray(token_ids, dtype=np.int32),
            "seq_ids": np.asarray(seq_ids, dtype=np.int32),
            "positions": np.asarray(positions, dtype=np.int32),
            "step_ids": np.full(num_tokens, self._num_steps, dtype=np.int32),
        }
        if hidden is not None:
            step["hidden"] = _stack_layers(hidden, np.float16)
        for key, value in step.items():
            if value.shape[0] != num_tokens:
                raise ValueError(f"{key} has {value.shape[0]} rows, topk_ids has {num_tokens}")
            self._parts[key].append(value)
        self._num_steps += 1

    def to_trace(self) -> Trace:
        """The trace so far (validated); raises ``ValueError`` before the first step."""
        if not self._num_steps:
            raise ValueError("no step was added to the trace")
        arrays = {key: np.concatenate(self._parts[key]) for key in _ARRAYS}
        hidden = np.concatenate(self._parts["hidden"]) if self._parts["hidden"] else None
        return Trace(meta=self.meta, hidden=hidden, **arrays)

    def write(self, path: str | os.PathLike, compress: bool = True) -> Path:
        return save_trace(self.to_trace(), path, compress=compress)


def _stack_layers(value: Sequence[np.ndarray] | np.ndarray, dtype: type) -> np.ndarray:
    """``[T, L, ...]`` from one array or a list of per-layer ``[T, ...]`` arrays."""
    if isinstance(value, np.ndarray):
        return value.astype(dtype, copy=False)
    return np.stack([np.asarray(v) for v in value], axis=1).astype(dtype, copy=False)


def read_shared_jsonl(path: str | os.PathLike) -> Trace:
    """Read a JSON-lines trace of ``shared/traces`` (first line: header with the fields).

    Rows carry ``seq`` or ``req_id``, ``pos``, ``experts`` ``[layer][k]``, and
    ``gate_probs`` or ``weights``; ``token_ids`` is -1 where ``token_id`` is absent.
    ``layers_logged`` in the header (a subset of layers) becomes ``layer_ids``.

    Steps are not recorded in these files, so they are inferred:

    * if every sequence's ``pos`` only increases (the Mixtral decode traces), the
      sequences are taken to decode together, one token each per step: a row's
      step is its rank within its sequence;
    * if some sequence's ``pos`` starts over (the Qwen trace: one ``req_id`` for
      all rows, ``pos`` restarting 129 times), each run of increasing ``pos`` is one
      forward batch: a step of its own.
    """
    path = Path(path)
    with open(path) as f:
        header = json.loads(f.readline())
        rows = [json.loads(line) for line in f if line.strip()]
    names = [str(r["seq"] if "seq" in r else r["req_id"]) for r in rows]
    seq_names = list(dict.fromkeys(names))
    number = {name: i for i, name in enumerate(seq_names)}
    seq_ids = np.array([number[n] for n in names], dtype=np.int32)
    positions = np.array([r["pos"] for r in rows], dtype=np.int32)
    weights_key = "gate_probs" if rows and "gate_probs" in rows[0] else "weights"
    num_experts = int(header["num_experts"])
    meta = TraceMeta(
        model=header["model"],
        num_layers=int(header["num_layers"]),
        num_experts=num_experts,
        top_k=int(header["top_k"]),
        layer_ids=tuple(header.get("layers_logged", range(int(header["num_layers"])))),
        seq_names=tuple(seq_names),
        source=str(path),
        notes="; ".join(str(header[k]) for k in ("phase", "note") if k in header),
    )
    return Trace(
        meta=meta,
        topk_ids=np.array([r["experts"] for r in rows], dtype=np.int16 if num_experts < 2**15 else np.int32),
        topk_weights=np.array([r[weights_key] for r in rows], dtype=np.float32),
        token_ids=np.array([r.get("token_id", -1) for r in rows], dtype=np.int32),
        seq_ids=seq_ids,
        positions=positions,
        step_ids=_infer_steps(seq_ids, positions),
        path=str(path),
    )


def _infer_steps(seq_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Step of each row of a file without steps (rules in ``read_shared_jsonl``)."""
    restarts = np.zeros(len(seq_ids), dtype=bool)
    rank = np.zeros(len(seq_ids), dtype=np.int32)
    last: dict[int, int] = {}
    count: dict[int, int] = {}
    for i, (seq, pos) in enumerate(zip(seq_ids.tolist(), positions.tolist())):
        restarts[i] = seq in last and pos <= last[seq]
        last[seq] = pos
        rank[i] = count.get(seq, 0)
        count[seq] = rank[i] + 1
    if not restarts.any():
        return rank
    new_run = np.ones(len(seq_ids), dtype=bool)
    new_run[1:] = positions[1:] <= positions[:-1]
    return (np.cumsum(new_run) - 1).astype(np.int32)


def with_meta(trace: Trace, **changes: object) -> Trace:
    """A copy of ``trace`` with some metadata replaced (e.g. ``expert_bytes``)."""
    return replace(trace, meta=replace(trace.meta, **changes))
