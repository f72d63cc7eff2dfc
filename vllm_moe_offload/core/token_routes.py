"""Where each MoE layer last sent each input token: a decode step's experts, told from its token alone.

Routing depends much on the token a step processes, and not only in the first layers: on the trained
tiny-mixtral's greedy decode (16 prompts of 32 tokens, 128 new tokens each), the experts a layer routed a
token to the last time it processed that token are the step's again for 0.91 of them, over all eight
layers (0.79 on tiny-pymoe; on the real Mixtral-8x7B decode traces, learned from their own 333 and 244
tokens only, 0.62 on humaneval and 0.47 on gsm8k). The token of a batch-1 decode step is known before its
first layer runs, so the step's experts of every layer can be loaded that many layers ahead, where Fate's
cross-layer gate sees one layer ahead (``integration/token_prefetch.py``). The last routing predicts as
well as a count over every earlier occurrence or one that halves at each (0.906 against 0.873 and 0.906 on
tiny-mixtral; ``scripts/measure/token_routes.py``), so only the last is kept.

No torch, no vLLM.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

#: tokens remembered at most, the least recently seen leaving first: a 150k-token vocabulary's every token
#: would hold some 150 MB of Python lists on a 32-layer model; 65536 cover the tokens a session meets
#: often (one a step, and a prompt's), in a few tens of MB at most
MAX_TOKENS = 1 << 16


class TokenRoutes:
    """The experts each of ``num_layers`` layers (by ordinal) routed each token to when it last saw it."""

    def __init__(self, num_layers: int, max_tokens: int = MAX_TOKENS) -> None:
        if num_layers <= 0 or max_tokens <= 0:
            raise ValueError(f"num_layers and max_tokens must be positive, got {num_layers} and {max_tokens}")
        self.num_layers = num_layers
        self.max_tokens = max_tokens
        # token -> each layer's last routing of it (None: not seen there), least recently seen token first
        self._routes: dict[int, list[Sequence[int] | None]] = {}

    def __len__(self) -> int:
        return len(self._routes)

    def observe(self, ordinal: int, tokens: Sequence[int], rows: Iterable[Sequence[int]]) -> None:
        """Layer ``ordinal`` routed ``tokens[i]`` to the experts ``rows[i]`` (its top-k, in any order).

        A token that occurs more than once keeps its last row. Negative tokens (padding, or unknown) are
        skipped. The first layer's observation moves a token to the most recent end (every step reaches it
        first); past ``max_tokens`` the least recently seen token is forgotten. ``rows`` are kept as given:
        the caller must not change them afterwards.
        """
        if not 0 <= ordinal < self.num_layers:
            raise ValueError(f"layer ordinal {ordinal} is outside 0..{self.num_layers - 1}")
        routes = self._routes
        for token, row in dict(zip(tokens, rows)).items():  # a prompt's repeated tokens: their last rows
            if token < 0:
                continue
            entry = routes.pop(token, None) if ordinal == 0 else routes.get(token)
            if entry is None:
                if len(routes) >= self.max_tokens:
                    del routes[next(iter(routes))]
                entry = [None] * self.num_layers
                routes[token] = entry
            elif ordinal == 0:
                routes[token] = entry
            entry[ordinal] = row

    def predict(self, ordinal: int, token: int) -> Sequence[int]:
        """The experts layer ``ordinal`` routed ``token`` to when it last saw it; empty if it never did."""
        entry = self._routes.get(token)
        return () if entry is None or entry[ordinal] is None else entry[ordinal]
