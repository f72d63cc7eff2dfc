"""Next-token prefetch: a batch-1 decode step's experts, told from its input token, loaded before its layers run.

Fate's cross-layer gate predicts a layer's experts one layer ahead; at batch 1 on the padded tiny Mixtral
that leaves about 0.6 ms of compute to hide a 0.9 ms load. The step's input token is known before any
layer runs, and each layer mostly sends a token where it sent it the last time (``core/token_routes.py``),
so a forward pre-hook on the model predicts every offloaded layer's experts from the token and queues their
loads, the first layer's first: layer ``i`` gets ``i`` layers of compute to hide them in. Each layer's
routing of every step, prompts and batches included, teaches the table.

A prediction for layer ``i`` goes through that layer's prefetch gate (``core/prefetch_gate.py``) under its
own key, ``i`` layers ahead, with the link time of the earlier layers' predicted loads queued before it
counted off its lead; the first layer's, made with no layer's compute before it, is only scored. The
loads spare experts the cache expects to use first (``spare_useful``), queue behind every demand load, and
those the step's routing turns out not to need are cancelled when their layer runs, if they have not
started.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch

from vllm_moe_offload.core.prefetch_gate import step_kind
from vllm_moe_offload.core.token_routes import TokenRoutes
from vllm_moe_offload.integration.passes import row_experts

#: up to this many rows a step's rows are told to the table as they are; above, each distinct token's last
#: row only (a 4096-token prompt chunk of tiny-mixtral's text holds about 860 distinct tokens)
_FEW_ROWS = 64

#: the ``predictor`` these predictions are scored under (``LayerSlots.prefetch``): apart from the routers'
PREDICTOR = "token-table"


class TokenPrefetch:
    """The next-token table of ``layers`` (the offloaded MoE layers, in run order) and its prefetches."""

    def __init__(self, layers: Sequence, gated: bool) -> None:
        self.layers = list(layers)
        self.gated = gated
        self.routes = TokenRoutes(len(self.layers))
        self._tokens: list[int] | None = None  # the running step's input tokens, one per row, or its distinct ones
        self._last_rows: torch.Tensor | None = None  # a big step's: the last row of each of its distinct tokens
        self._num_rows = 0  # a big step's rows
        self._sampled: int | None = None  # the token the last step sampled and predicted from, if one
        for ordinal, layer in enumerate(self.layers):
            layer.observe_tokens = functools.partial(self.observe, ordinal)

    def attach(self, model: torch.nn.Module):
        """Install the forward pre-hook on ``model`` that predicts each step; returns its handle."""
        return model.register_forward_pre_hook(self._before_forward, with_kwargs=True)

    def _before_forward(self, module, args, kwargs) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        self._tokens = self._last_rows = None
        if input_ids is not None:
            flat = input_ids.reshape(-1)
            if flat.numel() <= _FEW_ROWS:
                self._tokens = flat.tolist()
            else:  # each distinct token's last row, found once for every layer
                tokens, first = np.unique(flat.cpu().numpy()[::-1], return_index=True)
                self._tokens, self._last_rows = tokens.tolist(), torch.from_numpy(flat.numel() - 1 - first)
                self._num_rows = flat.numel()
        sampled, self._sampled = self._sampled, None
        if self._tokens is not None and len(self._tokens) == 1 and self._tokens[0] != sampled:
            self.prefetch(self._tokens[0])

    def after_sampling(self, output) -> None:
        """The worker's step sampled ``output`` (vLLM's ``ModelRunnerOutput``): where one request sampled one
        token, that token is the request's next input (unless it ended), so its experts are predicted now,
        with the engine's time before the next forward (its output processing and scheduling, about a layer's
        compute in one process, more across processes) added to every layer's lead."""
        sampled = getattr(output, "sampled_token_ids", None)
        if isinstance(sampled, list) and len(sampled) == 1 and len(sampled[0]) == 1:
            self._sampled = int(sampled[0][0])
            self.prefetch(self._sampled, ahead=1)

    def prefetch(self, token: int, ahead: int = 0) -> None:
        """Queue each layer's loads of what it routed ``token`` to last, the first layer's first.

        ``ahead``: layers' worth of compute before the first layer runs (1 from the sampler, 0 from the
        forward's start): layer ``i``'s prediction counts ``i + ahead`` layers of lead.
        """
        backlog_s = 0.0  # link time of the earlier layers' predicted loads, queued ahead of this layer's
        kind = step_kind(1) if self.gated else None
        for ordinal, layer in enumerate(self.layers):
            slots = layer.slots
            experts = self.routes.predict(ordinal, token)
            if slots is None or slots.fully_resident or not experts:
                continue
            slots.prefetch(experts, spare_useful=True, distance=ordinal + ahead, gate=kind, backlog_s=backlog_s,
                           predictor=PREDICTOR)
            backlog_s += len(slots.in_flight(experts)) * (slots.load_s_ema or 0.0)

    def observe(self, ordinal: int, topk_ids: torch.Tensor) -> None:
        """Layer ``ordinal`` routed the running step's rows to ``topk_ids [T, k]``: remember it per token.

        Skipped where the step's tokens are unknown or do not match the rows one to one.
        """
        tokens = self._tokens
        if tokens is None:
            return
        if self._last_rows is None:
            if len(tokens) == topk_ids.shape[0]:
                self.routes.observe(ordinal, tokens, row_experts(topk_ids))
        elif self._num_rows == topk_ids.shape[0]:
            self.routes.observe(ordinal, tokens, row_experts(topk_ids[self._last_rows.to(topk_ids.device)]))


def attach(model: torch.nn.Module, layers: Sequence, gated: bool) -> TokenPrefetch:
    """Predict batch-1 decode steps' experts from their input token for ``layers`` of ``model``."""
    prefetcher = TokenPrefetch(layers, gated)
    prefetcher.attach(model)
    return prefetcher
