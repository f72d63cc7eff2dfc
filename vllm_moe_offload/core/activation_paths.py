"""Expert activation paths of live requests, matched against finished ones (MoE-Infinity style).

The serving counterpart of the ``eap`` predictor the simulator replays
(``core/predictors.py``), keyed by request id instead of trace rows. Each live
request keeps an activation matrix ``[L, E]``: how many of its tokens each
expert served so far, per MoE layer. To predict layer ``l`` for a step, each
request's matrix is matched by cosine similarity against the matrices of
finished requests; the best match's counts at layer ``l`` rank the experts.
The step's requests' rankings, each normalised to sum 1, are added.

Edge cases (part of the contract): with no finished request yet, a request's
own counts at ``l`` rank the experts; a request with no counts yet uses the sum
of the history at ``l``; with neither, it adds nothing, and a step with no
ranking predicts nothing. The history keeps the newest ``max_history`` requests.
No torch, no vLLM.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence

import numpy as np


class ActivationPaths:
    """Activation matrices of live requests and a bounded history of finished ones."""

    def __init__(self, num_layers: int, num_experts: int, max_history: int = 1024) -> None:
        if num_layers < 1 or num_experts < 1 or max_history < 1:
            raise ValueError(
                f"need num_layers, num_experts and max_history >= 1; got {num_layers}, {num_experts}, {max_history}"
            )
        self.num_layers = num_layers
        self.num_experts = num_experts
        self._live: dict[str, np.ndarray] = {}
        self._history: deque[np.ndarray] = deque(maxlen=max_history)
        self._unit: np.ndarray | None = None  # [H, L*E] unit rows of the history, rebuilt lazily

    def __len__(self) -> int:
        """Finished requests remembered."""
        return len(self._history)

    def observe(self, request_ids: Sequence[str | None], layer: int, topk_ids: np.ndarray) -> None:
        """Tokens routed at ``layer``: row ``t`` of ``topk_ids [T, k]`` belongs to ``request_ids[t]`` (None: padding)."""
        for req_id, experts in zip(request_ids, np.asarray(topk_ids)):
            if req_id is None:
                continue
            matrix = self._live.get(req_id)
            if matrix is None:
                matrix = self._live[req_id] = np.zeros((self.num_layers, self.num_experts))
            np.add.at(matrix[layer], experts, 1)

    def predict(self, request_ids: Iterable[str], layer: int, k: int) -> list[int]:
        """At most ``k`` experts of ``layer`` the step's requests will want, best first."""
        scores = np.zeros(self.num_experts)
        for req_id in set(request_ids):
            row = self._expected(req_id, layer)
            if row.sum() > 0:
                scores += row / row.sum()
        order = np.argsort(-scores, kind="stable")[:k]
        return [int(e) for e in order if scores[e] > 0]

    def finish(self, request_ids: Iterable[str]) -> None:
        """These requests ended: their matrices join the history (empty ones are dropped)."""
        for req_id in request_ids:
            matrix = self._live.pop(req_id, None)
            if matrix is not None and matrix.any():
                self._history.append(matrix)
                self._unit = None

    def live(self) -> set[str]:
        return set(self._live)

    def _expected(self, req_id: str, layer: int) -> np.ndarray:
        current = self._live.get(req_id)
        has_counts = current is not None and current.any()
        if not self._history:
            return current[layer] if has_counts else np.zeros(self.num_experts)
        if not has_counts:
            return np.sum([h[layer] for h in self._history], axis=0)
        if self._unit is None:
            flat = np.stack([h.ravel() for h in self._history])  # [H, L*E]
            self._unit = flat / np.linalg.norm(flat, axis=1, keepdims=True)
        best = int(np.argmax(self._unit @ current.ravel()))
        return self._history[best][layer]
